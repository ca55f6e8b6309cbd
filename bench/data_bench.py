"""The data path at two corpus sizes: cached preparation (1 and 2 processes), streaming, the raw tokenizer.

    python -m bench.data_bench [--sizes-mb 100 1000] [--seq-len 1024] [--global-batch 32]

Corpora: KJV verses shuffled into documents of 5-60 verses (realistic text, realistic document lengths), generated
here; a byte-level BPE of 8,192 tokens trained on the KJV. Every measurement runs in a fresh process (its peak
resident memory is the row's) with fresh caches (bench.fresh_work_dir). Columns:

- tokens/s: tokens of the corpus over the wall time of the preparation (cached: tokenize, pack and write the
  entry; streaming: the blocks one data-reading rank packs, read to the end of the corpus).
- first batch s: until the first global batch is packed (streaming), or the whole preparation (cached).
- wait/step s: what a training step waits for its global batch (--global-batch x --seq-len tokens), on average.
- peak MB: resident memory of the largest process (the measuring one, or one of the map's workers).
- disk left: bytes written outside the packed entry and still there afterwards (datasets' caches, work folders).
"""

import argparse
import json
import random
import resource
import shutil
import subprocess
import sys
import time
from pathlib import Path

from bench import fresh_work_dir


def synthetic_corpus(path: Path, megabytes: int) -> Path:
    from train.data.sources import embedded_corpus

    verses = [json.loads(line)["text"] for line in open(embedded_corpus())]
    rng = random.Random(0)
    written = 0
    with open(path, "w") as f:
        while written < megabytes * 2**20:
            line = json.dumps({"text": " ".join(rng.choices(verses, k=rng.randint(5, 60)))}) + "\n"
            f.write(line)
            written += len(line)
    return path


def folder_bytes(folder: Path) -> int:
    return sum(f.stat().st_size for f in folder.rglob("*") if f.is_file()) if folder.exists() else 0


def measure(kind: str, corpus: Path, tokenizer_dir: Path, work: Path, seq_len: int, global_batch: int) -> dict:
    """One measurement, in this (fresh) process."""
    from train.data.examples import TEXT
    from train.data.packing import packed_source
    from train.data.sources import resolve_sources
    from train.data.streaming import BlockStream, SourceBlocks, record_batches
    from train.data.tokenizer import load_tokenizer

    tokenizer, (source,) = load_tokenizer(str(tokenizer_dir)), resolve_sources([str(corpus)])
    start, row = time.perf_counter(), {}
    if kind == "raw tokenizer":
        tokens = 0
        for _, batch in record_batches(source, TEXT):
            tokens += sum(len(ids) for ids in tokenizer(batch["text"], add_special_tokens=False)["input_ids"])
        row["first batch s"] = None
    elif kind.startswith("cached"):
        procs = int(kind.split()[1])
        blocks = packed_source(source, TEXT, tokenizer, seq_len=seq_len, cache_dir=work / "cache", num_proc=procs)
        tokens = len(blocks) * seq_len
        row["first batch s"] = time.perf_counter() - start
        row["packed MB"] = folder_bytes(work / "cache") / 2**20
    else:
        sources = [SourceBlocks(source, TEXT, tokenizer, seq_len)]
        stream = iter(BlockStream(sources, weights=None, seed=0, held_out=[0]))
        tokens, first, waits, in_batch, batch_start = 0, None, [], 0, time.perf_counter()
        for item in stream:
            if item is None:
                break
            tokens += seq_len
            in_batch += 1
            if in_batch == global_batch:
                waits.append(time.perf_counter() - batch_start)
                first = first or time.perf_counter() - start
                in_batch, batch_start = 0, time.perf_counter()
        row["first batch s"], row["wait/step s"] = first, sum(waits) / len(waits)
    seconds = time.perf_counter() - start
    # The largest process: this one, or one of the map's workers (`cached 2`).
    peak_kb = max(resource.getrusage(who).ru_maxrss for who in (resource.RUSAGE_SELF, resource.RUSAGE_CHILDREN))
    peak_mb = peak_kb / 1024
    return {**row, "tokens": tokens, "seconds": seconds, "tokens/s": tokens / seconds, "peak MB": peak_mb}


def run_measurement(kind: str, corpus: Path, tokenizer_dir: Path, args) -> dict:
    work = fresh_work_dir(f"data_bench_{kind.replace(' ', '_')}")
    command = [sys.executable, "-m", "bench.data_bench", "--measure", kind, "--corpus", str(corpus)]
    command += ["--tokenizer", str(tokenizer_dir), "--work", str(work)]
    command += ["--seq-len", str(args.seq_len), "--global-batch", str(args.global_batch)]
    done = subprocess.run(command, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise SystemExit(f"error: {kind} on {corpus} failed:\n{done.stderr[-3000:]}")
    row = json.loads(done.stdout.strip().splitlines()[-1])
    row["disk left MB"] = folder_bytes(work) / 2**20 - row.get("packed MB", 0)
    shutil.rmtree(work)
    return row


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--sizes-mb", type=int, nargs="+", default=[100, 1000])
    p.add_argument("--seq-len", type=int, default=1024)
    p.add_argument("--global-batch", type=int, default=32)
    p.add_argument("--measure", default=None, help=argparse.SUPPRESS)  # one measurement, in a fresh process
    p.add_argument("--corpus", type=Path, default=None, help=argparse.SUPPRESS)
    p.add_argument("--tokenizer", type=Path, default=None, help=argparse.SUPPRESS)
    p.add_argument("--work", type=Path, default=None, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.measure:
        row = measure(args.measure, args.corpus, args.tokenizer, args.work, args.seq_len, args.global_batch)
        print(json.dumps(row))
        return
    from train.data.sources import embedded_corpus
    from train.data.tokenizer import train_bpe_tokenizer

    work = fresh_work_dir("data_bench")
    verses = (json.loads(line)["text"] for line in open(embedded_corpus()))
    train_bpe_tokenizer(verses, 8192, work / "tokenizer")
    kinds = ["raw tokenizer", "cached 1", "cached 2", "streaming"]
    tokens_per_step = args.global_batch * args.seq_len
    print(f"seq_len {args.seq_len}, global batch {args.global_batch}: wait/step is per {tokens_per_step:,} tokens")
    print("| corpus | path | tokens | tokens/s | first batch s | wait/step s | peak MB | packed MB | disk left MB |")
    print("| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
    for megabytes in args.sizes_mb:
        corpus = synthetic_corpus(work / f"syn_{megabytes}mb.jsonl", megabytes)
        for kind in kinds:
            row = run_measurement(kind, corpus, work / "tokenizer", args)
            cells = [
                f"{row['tokens']:,}",
                f"{row['tokens/s']:,.0f}",
                f"{row['first batch s']:.2f}" if row.get("first batch s") is not None else "",
                f"{row['wait/step s']:.3f}" if "wait/step s" in row else "",
                f"{row['peak MB']:,.0f}",
                f"{row['packed MB']:,.0f}" if "packed MB" in row else "",
                f"{row['disk left MB']:.1f}",
            ]
            path = {"cached 1": "cached, 1 process", "cached 2": "cached, 2 processes"}.get(kind, kind)
            print(f"| {megabytes} MB | {path} | " + " | ".join(cells) + " |", flush=True)
        corpus.unlink()
    shutil.rmtree(work)


if __name__ == "__main__":
    main()
