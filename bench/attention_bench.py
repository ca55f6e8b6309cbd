"""The cost of document attention: tokens/s and peak memory of `--attention document` vs `causal`, one invocation.

    python -m bench.attention_bench [--cases gpt2-tiny:128 gpt2-tiny:256 llama-tiny:128 llama-tiny:512]
                                    [--steps 8] [--repeats 2]

Each case trains the preset as one pipeline stage (the layers DeepSpeed runs, transformers' masks and kernels)
forward and backward, micro-batch 4, on packed blocks of documents whose lengths are drawn around 48 tokens
(a verse of the default corpus is ~40, a short chat example ~100): the positions restart at every document
under `document`, and run 0..S-1 under `causal`. Every case runs in a fresh process, one torch thread, the modes
alternating `--repeats` times. The table gives the median tokens/s after one warm-up step, and the peak
resident memory that the steps added to what the model held (SDPA's boolean [B, 1, S, S] mask per layer, and
what a masked SDPA keeps for backward instead of the `is_causal` kernel's). On a GPU device `bench.gpu_bench`
times the same pair.
"""

import argparse
import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
MICRO, VOCAB, MEAN_DOCUMENT = 4, 8192, 48


def packed_positions(batch: int, seq_len: int, seed: int):
    """[batch, seq_len] positions of blocks packed with documents of geometric lengths around MEAN_DOCUMENT."""
    import torch

    generator = torch.Generator().manual_seed(seed)
    rows = []
    for _ in range(batch):
        row: list[int] = []
        while len(row) < seq_len:
            length = 1 + int(torch.empty(1).geometric_(1 / MEAN_DOCUMENT, generator=generator).item())
            row += range(length)
        rows.append(row[:seq_len])
    return torch.tensor(rows)


def measure(preset: str, seq_len: int, document: bool, steps: int) -> dict:
    """tokens/s and the peak memory added by `steps` forward/backward passes (runs in its own process)."""
    import resource
    import time

    import torch

    from models.architecture import discover
    from models.loss import IGNORE_INDEX, next_token_cross_entropy
    from models.pipeline import build_pipeline
    from models.presets import preset_config
    from train.distributed.setup import init_distributed
    from train.observe.memory import memory_in_use

    torch.set_num_threads(1)
    os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1", MASTER_PORT="29681")
    init_distributed()
    arch = discover(preset_config(preset, VOCAB))
    pipe = build_pipeline(arch, num_stages=1, seq_len=seq_len).train()
    ids = torch.randint(0, VOCAB, (MICRO, seq_len), generator=torch.Generator().manual_seed(0))
    positions = packed_positions(MICRO, seq_len, seed=1) if document else torch.arange(seq_len).expand(MICRO, -1)
    labels = ids.masked_fill(positions == 0, IGNORE_INDEX) if document else ids
    times, held = [], memory_in_use()
    for _ in range(steps + 1):
        start = time.perf_counter()
        pipe.zero_grad(set_to_none=False)
        next_token_cross_entropy(pipe((ids, positions)), labels).backward()
        times.append(time.perf_counter() - start)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    return {"tokens_per_sec": MICRO * seq_len / statistics.median(times[1:]), "added_mb": (peak - held) / 2**20}


def run_case(preset: str, seq_len: int, document: bool, steps: int) -> dict:
    call = f"measure({preset!r}, {seq_len}, {document}, {steps})"
    code = f"import json; from bench.attention_bench import measure; print(json.dumps({call}))"
    env = {**os.environ, "DS_ACCELERATOR": os.environ.get("DS_ACCELERATOR", "cpu"), "OMP_NUM_THREADS": "1"}
    env["PYTHONPATH"] = f"{REPO}{os.pathsep}{env.get('PYTHONPATH', '')}"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, cwd=REPO, check=False)
    if out.returncode != 0:
        raise SystemExit(f"error: {preset} at {seq_len}: {out.stderr.strip().splitlines()[-1]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--cases", nargs="+", default=["gpt2-tiny:128", "gpt2-tiny:256", "llama-tiny:128", "llama-tiny:512"])
    p.add_argument("--steps", type=int, default=8)
    p.add_argument("--repeats", type=int, default=2)
    a = p.parse_args()
    cases = [(case.split(":")[0], int(case.split(":")[1])) for case in a.cases]
    results: dict[tuple, list[dict]] = {}
    for _ in range(a.repeats):
        for preset, seq_len in cases:
            for document in (False, True):
                results.setdefault((preset, seq_len, document), []).append(run_case(preset, seq_len, document, a.steps))
    print(f"one stage, one thread, micro-batch {MICRO}, documents ~{MEAN_DOCUMENT} tokens, {a.repeats} runs each")
    print("| model | seq | causal tokens/s | document tokens/s | document/causal | causal +MB | document +MB |")
    print("| --- | ---: | ---: | ---: | ---: | ---: | ---: |")
    for preset, seq_len in cases:
        causal, document = (results[(preset, seq_len, d)] for d in (False, True))
        speed = [statistics.median(r["tokens_per_sec"] for r in runs) for runs in (causal, document)]
        memory = [max(r["added_mb"] for r in runs) for runs in (causal, document)]
        print(
            f"| {preset} | {seq_len} | {speed[0]:,.0f} | {speed[1]:,.0f} | {speed[1] / speed[0]:.2f} | "
            f"{memory[0]:.0f} | {memory[1]:.0f} |"
        )


if __name__ == "__main__":
    main()
