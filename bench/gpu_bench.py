"""GPU throughput, MFU and memory of the pipeline engine, one stage, bf16, in one short go.

    python -m bench.gpu_bench [--models gpt2-medium gpt2-large] [--steps 20] [--micro-batch-size 8]

For a lent GPU: random tokens (no data path), vocab 50257, seq 1024, ZeRO-1, fp32 gradient
accumulation, the optimizer of `ds_configs/gpu_bf16.json` (DeepSpeed's FusedAdam, JIT-built on first
use; `--torch-adam` takes torch's AdamW instead). Each model runs without and with activation
checkpointing of every block. Prints a markdown table: tokens/s, TFLOP/s and MFU (`train/mfu.py`'s
peak table) of the median step, and the peak memory the model added beside `train.plan`'s estimate.
"""

import argparse
import itertools
import json
import os
import statistics
import time
from pathlib import Path

os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1", MASTER_PORT="29544")

import deepspeed  # noqa: E402
import torch  # noqa: E402
from deepspeed.accelerator import get_accelerator  # noqa: E402

from models.architecture import discover  # noqa: E402
from models.flops import flops_per_token  # noqa: E402
from models.pipeline import build_pipeline  # noqa: E402
from models.presets import resolve_model_config  # noqa: E402
from train.distributed import init_distributed  # noqa: E402
from train.memory_model import plan_stages  # noqa: E402
from train.mfu import device_name, peak_tflops, tflops_and_mfu  # noqa: E402

GPU_CONFIG = Path(__file__).resolve().parent.parent / "ds_configs" / "gpu_bf16.json"


def bench_one(name: str, checkpoint_interval: int, a: argparse.Namespace, peak: float | None) -> str:
    accelerator = get_accelerator()
    arch = discover(resolve_model_config(name, None, None))
    optimizer = json.loads(GPU_CONFIG.read_text())["optimizer"]
    if a.torch_adam:
        optimizer["params"]["torch_adam"] = True
    ds_config = {
        "train_batch_size": a.micro_batch_size * a.micro_batches,
        "train_micro_batch_size_per_gpu": a.micro_batch_size,
        "optimizer": optimizer,
        "bf16": {"enabled": True},
        "data_types": {"grad_accum_dtype": "fp32"},
        "gradient_clipping": 1.0,
        "zero_optimization": {"stage": 1},
        "steps_per_print": 10**9,
    }
    accelerator.empty_cache()
    before = accelerator.memory_allocated()
    accelerator.reset_peak_memory_stats()
    pipe = build_pipeline(arch, num_stages=1, activation_checkpoint_interval=checkpoint_interval, seq_len=a.seq_len)
    engine, *_ = deepspeed.initialize(model=pipe, model_parameters=pipe.parameters(), config=ds_config)
    ids = torch.randint(0, arch.config.vocab_size, (a.micro_batch_size, a.seq_len))
    batches = itertools.repeat((ids, ids))
    times = []
    for _ in range(a.steps):
        accelerator.synchronize()
        start = time.perf_counter()
        engine.train_batch(batches)
        accelerator.synchronize()
        times.append(time.perf_counter() - start)
    measured = (accelerator.max_memory_allocated() - before) / 2**30
    planned = plan_stages(arch, ds_config, 1, 1, a.seq_len, "flops", checkpoint_interval)[0]
    tokens_per_sec = a.micro_batch_size * a.micro_batches * a.seq_len / statistics.median(times[3:])
    perf = tflops_and_mfu(flops_per_token(arch, a.seq_len), tokens_per_sec, 1, peak)
    mfu = f"{perf['mfu']:.1%}" if perf["mfu"] is not None else "n/a"
    params = sum(p.numel() for p in pipe.parameters()) / 1e6
    del engine, pipe
    return (
        f"| {name} | {params:.0f}M | {'every block' if checkpoint_interval else 'off'} | {tokens_per_sec:,.0f} | "
        f"{perf['tflops_per_device']:.1f} | {mfu} | {measured:.1f} | {planned.peak / 2**30:.1f} "
        f"({planned.memory['activations'] / 2**30:.1f}) | {planned.peak / 2**30 / measured:.2f} |"
    )


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--models", nargs="+", default=["gpt2-medium", "gpt2-large"])
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--micro-batch-size", type=int, default=8)
    p.add_argument("--micro-batches", type=int, default=4)
    p.add_argument("--seq-len", type=int, default=1024)
    p.add_argument("--torch-adam", action="store_true", help="torch's AdamW instead of DeepSpeed's FusedAdam")
    a = p.parse_args()
    init_distributed()
    peak = peak_tflops("bf16")
    print(
        f"device: {device_name()}, bf16 peak {peak} TFLOP/s, torch {torch.__version__}, "
        f"micro-batch {a.micro_batch_size} x {a.micro_batches}, seq {a.seq_len}"
    )
    print(
        "| model | parameters | activation checkpointing | tokens/s | TFLOP/s | MFU | peak memory GiB "
        "| planned GiB (activations) | planned / measured |"
    )
    print("| --- | ---: | --- | ---: | ---: | ---: | ---: | ---: | ---: |")
    for name in a.models:
        for checkpoint_interval in (0, 1):
            print(bench_one(name, checkpoint_interval, a, peak), flush=True)


if __name__ == "__main__":
    main()
