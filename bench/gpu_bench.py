"""GPU throughput, MFU and peak memory of the pipeline engine, one stage, bf16, in one short go.

    python -m bench.gpu_bench [--models gpt2-medium gpt2-large] [--steps 20] [--micro-batch-size 8]

For a lent GPU: random tokens (no data path), vocab 50257, seq 1024, ZeRO-1, fused Adam,
fp32 gradient accumulation. Prints a markdown table; MFU uses `train/mfu.py`'s peak table.
"""

import argparse
import itertools
import os
import statistics
import time

os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1", MASTER_PORT="29544")

import deepspeed  # noqa: E402
import torch  # noqa: E402
from deepspeed.accelerator import get_accelerator  # noqa: E402

from models.flops import flops_per_token  # noqa: E402
from models.gpt2_pipe import build_gpt2_pipeline  # noqa: E402
from models.presets import resolve_model_config  # noqa: E402
from train.distributed import init_distributed  # noqa: E402
from train.mfu import device_name, peak_tflops, tflops_and_mfu  # noqa: E402


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--models", nargs="+", default=["gpt2-medium", "gpt2-large"])
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--micro-batch-size", type=int, default=8)
    p.add_argument("--micro-batches", type=int, default=4)
    p.add_argument("--seq-len", type=int, default=1024)
    a = p.parse_args()
    accelerator = get_accelerator()
    init_distributed()
    peak = peak_tflops("bf16")
    print(f"device: {device_name()}, bf16 peak {peak} TFLOP/s")
    print("| model | parameters | tokens/s | TFLOP/s | MFU | peak memory GiB |")
    print("| --- | ---: | ---: | ---: | ---: | ---: |")
    for name in a.models:
        config = resolve_model_config(name, None, 50257)
        ds_config = {
            "train_batch_size": a.micro_batch_size * a.micro_batches,
            "train_micro_batch_size_per_gpu": a.micro_batch_size,
            "optimizer": {"type": "AdamW", "params": {"lr": 1e-4}},
            "bf16": {"enabled": True},
            "data_types": {"grad_accum_dtype": "fp32"},
            "zero_optimization": {"stage": 1},
            "steps_per_print": 10**9,
        }
        pipe = build_gpt2_pipeline(config, num_stages=1, seq_len=a.seq_len)
        engine, *_ = deepspeed.initialize(model=pipe, model_parameters=pipe.parameters(), config=ds_config)
        accelerator.reset_peak_memory_stats()
        ids = torch.randint(0, config.vocab_size, (a.micro_batch_size, a.seq_len))
        batches = itertools.repeat((ids, ids))
        times = []
        for _ in range(a.steps):
            accelerator.synchronize()
            start = time.perf_counter()
            engine.train_batch(batches)
            accelerator.synchronize()
            times.append(time.perf_counter() - start)
        tokens_per_sec = a.micro_batch_size * a.micro_batches * a.seq_len / statistics.median(times[3:])
        perf = tflops_and_mfu(flops_per_token(config, a.seq_len), tokens_per_sec, 1, peak)
        mfu = f"{perf['mfu']:.1%}" if perf["mfu"] is not None else "n/a"
        params = sum(p.numel() for p in pipe.parameters()) / 1e6
        memory = accelerator.max_memory_allocated() / 2**30
        print(f"| {name} | {params:.0f}M | {tokens_per_sec:,.0f} | {perf['tflops_per_device']:.1f} | {mfu} | "
              f"{memory:.1f} |", flush=True)  # fmt: skip
        del engine, pipe
        accelerator.empty_cache()


if __name__ == "__main__":
    main()
