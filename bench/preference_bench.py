"""Preference training (DPO) against supervised fine-tuning on the same pairs, model and layout, and what the
reference pass costs (docs/preference.md, docs/performance.md: Preference (DPO) vs SFT).

    python -m bench.preference_bench [--steps 10] [--pairs 1000]

A random Llama saved with `save_pretrained` (d 256, 4 layers, GQA 8/4 heads, SwiGLU 688, untied 8,192-token
head: the BPE trained here on the embedded corpus) trains, on 2 CPU ranks as 2 stages (fp32, ZeRO-1, AdamW,
4 micro-batches of 2 x 256 tokens), (a) SFT: `--data-format prompt-completion` on each pair's prompt + chosen,
(b) DPO: `--data-format preference` on the pairs. Printed: the blocks, seconds per step and block tokens/s
(medians after 2 warm-up steps: training steps only), the peak memory per rank (`model_mem_mb`, the method of
bench/memory_bench.py: glibc's mmap threshold pinned), and DPO's reference pass: its wall time (from the run's
own line), per global batch of blocks against a training step (the planner's model FLOPs say 1/3), and its share
of reference + one epoch of training steps (the planner: 1/4).
"""

import argparse
import itertools
import json
import math
import re
import statistics
from pathlib import Path

from bench.fixtures import QUIET_RUN, cli, deepspeed_command, write_json
from bench.memory_bench import bench_ds_config, bpe_work_dir, llama_base
from bench.pipeline_bench import run
from train.data.sources import embedded_corpus

SEQ, STAGES, MICRO, MICRO_BATCHES, EVAL_BLOCKS = 256, 2, 2, 4, 8
MODEL = dict(
    vocab_size=8192,
    hidden_size=256,
    intermediate_size=688,
    num_hidden_layers=4,
    num_attention_heads=8,
    num_key_value_heads=4,
    max_position_embeddings=SEQ,
    tie_word_embeddings=False,
)
REFERENCE_LINE = re.compile(r"reference log-probabilities of ([\d,]+) blocks in ([\d.]+) s")


def corpus_pairs(n: int) -> list[dict]:
    """Pairs from the corpus: a verse's first 6 words, its own rest (chosen) and the next verse's rest (rejected)."""
    verses = [json.loads(line)["text"].split() for line in itertools.islice(open(embedded_corpus()), 3 * n)]
    verses = [v for v in verses if len(v) >= 12][: n + 1]
    return [
        {"prompt": " ".join(v[:6]), "chosen": " " + " ".join(v[6:]), "rejected": " " + " ".join(w[6:])}
        for v, w in itertools.pairwise(verses)
    ]


def train(work: Path, name: str, steps: int, **flags) -> tuple[list[dict], str]:
    """A run's metrics rows and rank 0's output."""
    out = work / name
    ds = write_json(work / "ds.json", bench_ds_config(MICRO, MICRO_BATCHES))
    args = cli(
        tokenizer=work / "tokenizer",
        pipeline_stages=STAGES,
        deepspeed_config=ds,
        seq_len=SEQ,
        train_steps=steps,
        eval_blocks=EVAL_BLOCKS,
        output_dir=out,
        data_cache_dir=work / "cache",
        **{**QUIET_RUN, "sample_tokens": 0},
        **flags,
    )
    env = {"DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1", "MALLOC_MMAP_THRESHOLD_": "131072"}
    proc = run(deepspeed_command(STAGES, 29671, args), env=env)
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()], proc.stdout


def row(name: str, rows: list[dict], reference: tuple[int, float] | None) -> str:
    step = statistics.median(r["step_time"] for r in rows[2:])
    tokens = statistics.median(r["tokens_per_sec"] for r in rows[2:])
    memory = " / ".join(f"{rows[-1][f'model_mem_mb/stage{s}']:,.0f}" for s in range(STAGES))
    if reference is None:
        return f"| {name} | | {step:.2f} | {tokens:,.0f} | {memory} | | | |"
    blocks, seconds = reference
    global_batch = MICRO * MICRO_BATCHES
    train_blocks = blocks - EVAL_BLOCKS
    # The pass runs whole global batches: the training blocks' last one filled up, then the validation blocks'.
    batches = math.ceil(train_blocks / global_batch) + EVAL_BLOCKS // global_batch
    epoch = train_blocks / global_batch * step  # one epoch of training steps
    return (
        f"| {name} | {train_blocks:,} | {step:.2f} | {tokens:,.0f} | {memory} | {seconds:.1f} "
        f"| {seconds / batches:.2f} s = {seconds / batches / step:.2f} of a step | {seconds / (seconds + epoch):.0%} |"
    )


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--pairs", type=int, default=1000)
    a = p.parse_args()
    work = bpe_work_dir("preference_bench")
    base, arch, _ = llama_base(work, "llama", MODEL)
    pairs = corpus_pairs(a.pairs)
    (work / "pairs.jsonl").write_text("".join(json.dumps(x) + "\n" for x in pairs))
    sft = [{"prompt": x["prompt"], "completion": x["chosen"]} for x in pairs]
    (work / "sft.jsonl").write_text("".join(json.dumps(x) + "\n" for x in sft))
    common = dict(model=base, val_fraction=0.1)
    sft_rows, _ = train(work, "sft", a.steps, data=work / "sft.jsonl", data_format="prompt-completion", **common)
    dpo_rows, stdout = train(work, "dpo", a.steps, data=work / "pairs.jsonl", data_format="preference", **common)
    blocks, seconds = REFERENCE_LINE.search(stdout).groups()
    print(
        f"\n{len(pairs)} pairs, Llama {arch.parameters() / 1e6:.1f}M, {STAGES} stages on {STAGES} CPU ranks, "
        f"{MICRO_BATCHES} micro-batches of {MICRO} x {SEQ} tokens, fp32, ZeRO-1; medians of steps 3-{a.steps}"
    )
    print(
        "| training | training blocks | s/step | tokens/s | peak MB (stage 0 / 1) | reference pass s "
        "| reference per global batch of blocks | reference / (reference + one epoch) |"
    )
    print("| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
    print(row("SFT (prompt + chosen)", sft_rows, None))
    print(row("DPO (pairs)", dpo_rows, (int(blocks.replace(",", "")), float(seconds))))


if __name__ == "__main__":
    main()
