"""Data-path throughput: raw fast-tokenizer speed vs our tokenize+pack (+ write), and cached reload.

    python -m bench.data_bench [--synthetic-mb 100] [--num-proc N]

Corpora: the embedded King James Bible, and a synthetic one of KJV verses shuffled into
documents of 5-60 verses (realistic text, realistic document lengths), generated here.
"""

import argparse
import json
import os
import random
import shutil
import time
from pathlib import Path

from bench import fresh_work_dir
from train.data.examples import TEXT
from train.data.packing import packed_dataset, packed_source
from train.data.sources import embedded_corpus, load_texts, resolve_sources
from train.data.tokenizer import train_bpe_tokenizer


def synthetic_corpus(path: Path, megabytes: int) -> Path:
    verses = [json.loads(line)["text"] for line in open(embedded_corpus())]
    rng = random.Random(0)
    written = 0
    with open(path, "w") as f:
        while written < megabytes * 2**20:
            line = json.dumps({"text": " ".join(rng.choices(verses, k=rng.randint(5, 60)))}) + "\n"
            f.write(line)
            written += len(line)
    return path


def raw_tokens_per_sec(texts, tokenizer) -> tuple[float, int]:
    start, tokens = time.perf_counter(), 0
    for batch in texts.iter(batch_size=1000):
        tokens += sum(len(ids) for ids in tokenizer(batch["text"], add_special_tokens=False)["input_ids"])
    return tokens / (time.perf_counter() - start), tokens


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--synthetic-mb", type=int, default=100)
    p.add_argument("--num-proc", type=int, default=os.cpu_count())
    args = p.parse_args()
    work = fresh_work_dir("data_bench")
    texts = load_texts(resolve_sources([embedded_corpus()])[0], "text")
    tokenizer = train_bpe_tokenizer((b["text"] for b in texts.iter(batch_size=1000)), 8192, work / "tokenizer")
    corpora = {
        "embedded KJV (4.4 MB)": embedded_corpus(),
        f"synthetic ({args.synthetic_mb} MB)": str(synthetic_corpus(work / "syn.jsonl", args.synthetic_mb)),
    }
    print("| corpus | tokens | raw tokenizer tok/s | tokenize+pack tok/s | ratio | cached reload s |")
    print("| --- | ---: | ---: | ---: | ---: | ---: |")
    for name, path in corpora.items():
        source = resolve_sources([path])[0]
        texts = load_texts(source, "text")  # materialised once, as both paths read it
        raw, tokens = raw_tokens_per_sec(texts, tokenizer)
        cache = work / "cache"
        start = time.perf_counter()
        packed_source(source, TEXT, tokenizer, seq_len=128, cache_dir=cache, num_proc=args.num_proc)
        ours = tokens / (time.perf_counter() - start)
        start = time.perf_counter()
        splits = packed_dataset([source], TEXT, tokenizer, seq_len=128, val_fraction=0.02, cache_dir=cache)
        splits["train"][0]  # noqa: B018 (touch the memory map)
        reload = time.perf_counter() - start
        print(f"| {name} | {tokens:,} | {raw:,.0f} | {ours:,.0f} | {ours / raw:.2f} | {reload:.2f} |", flush=True)
    shutil.rmtree(work)


if __name__ == "__main__":
    main()
