"""Memory: the planner's estimate beside what training really holds, with and without activation checkpointing.

    python -m bench.memory_bench [--steps 4]

Each row trains a CPU-sized GPT-2 for a few steps through `train.main` (real ranks, fp32, ZeRO-1,
AdamW) and reads `model_mem_mb/stage<i>`: peak resident memory less what the rank held before the
model was built (glibc's mmap threshold pinned, so that freed tensors leave the RSS as they leave a
GPU allocator's counters). Beside it, `train.plan`'s estimate for the same model, layout and DeepSpeed config,
and the median seconds per step, so the cost of activation checkpointing shows next to its saving.
"""

import argparse
import json
import statistics
import time
from pathlib import Path

from bench import fresh_work_dir
from bench.fixtures import QUIET_RUN, cli, deepspeed_command, ds_config, tiny_gpt2, write_json
from bench.pipeline_bench import run
from models.architecture import discover
from models.hf_weights import config_from_dict
from train.planning.memory_model import plan_stages

SEQ, VOCAB = 128, 8192  # the vocabulary is the BPE tokenizer's, trained here on the embedded corpus
# (blocks, width, heads, stages, micro-batch, micro-batches)
CASES = [(8, 384, 6, 1, 4, 4), (8, 384, 6, 2, 4, 8), (6, 512, 8, 2, 4, 8)]


def train_and_read_memory(work: Path, case: tuple, checkpoint_interval: int, steps: int) -> tuple[dict, float, dict]:
    layers, d, heads, stages, micro, micro_batches = case
    config = tiny_gpt2(layers, d, heads, SEQ, vocab_size=VOCAB)
    ds = ds_config(
        micro * micro_batches,
        micro,
        scheduler=None,
        optimizer={"type": "AdamW", "params": {"lr": 1e-4, "torch_adam": True}},
    )
    name = f"{layers}x{d}_pp{stages}_ac{checkpoint_interval}"
    out = work / f"run_{name}_{time.time_ns()}"
    flags = cli(
        model_config=write_json(work / f"{name}.json", config),
        tokenizer=work / "tokenizer",
        seq_len=SEQ,
        pipeline_stages=stages,
        deepspeed_config=write_json(work / f"{name}_ds.json", ds),
        activation_checkpoint_interval=checkpoint_interval,
        train_steps=steps,
        eval_blocks=micro * micro_batches,
        output_dir=out,
        data_cache_dir=work / "cache",
        **QUIET_RUN,
    )
    env = {"DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": str(2 // stages), "MALLOC_MMAP_THRESHOLD_": "131072"}
    run(deepspeed_command(stages, 29658, flags), env=env)
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    measured = {s: rows[-1][f"model_mem_mb/stage{s}"] for s in range(stages)}
    plans = plan_stages(discover(config_from_dict(config)), ds, stages, 1, SEQ, "flops", checkpoint_interval)
    planned = {p.stage: (p.peak / 2**20, p.memory["activations"] / 2**20) for p in plans}
    return measured, statistics.median(r["step_time"] for r in rows[1:]), planned


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--steps", type=int, default=4)
    a = p.parse_args()
    from train.data.sources import embedded_corpus, load_texts, resolve_sources
    from train.data.tokenizer import train_bpe_tokenizer

    work = fresh_work_dir("memory_bench")
    texts = load_texts(resolve_sources([embedded_corpus()])[0], "text")
    train_bpe_tokenizer((b["text"] for b in texts.iter(batch_size=1000)), VOCAB, work / "tokenizer")
    print(
        "| model | stages | micro-batches | activation checkpointing | stage | planned peak MB (activations) "
        "| measured MB | planned / measured | s/step |"
    )
    print("| --- | ---: | ---: | --- | ---: | ---: | ---: | ---: | ---: |")
    for case in CASES:
        layers, d, _, stages, micro, micro_batches = case
        for interval in (0, 1):
            measured, step_time, planned = train_and_read_memory(work, case, interval, a.steps)
            for stage, mb in measured.items():
                peak, activations = planned[stage]
                checkpointing = "every block" if interval else "off"
                print(
                    f"| {layers} x {d} | {stages} | {micro_batches} x {micro} | {checkpointing} | {stage} "
                    f"| {peak:,.0f} ({activations:,.0f}) | {mb:,.0f} | {peak / mb:.2f} | {step_time:.2f} |",
                    flush=True,
                )


if __name__ == "__main__":
    main()
