"""GPU throughput, MFU and memory of the pipeline engine, one stage, bf16, eager and compiled, in one command.

    python -m bench.gpu_bench [--models gpt2-large llama-3.2-1b olmoe-1b-7b:4] [--steps 12] [--dry-run]

For a lent GPU (one run; about 5 minutes on an H100/H200): random tokens (no data path), seq 1024,
ZeRO-1, bf16 with fp32 gradient accumulation, the optimizer of `ds_configs/gpu_bf16.json` (DeepSpeed's
FusedAdam, JIT-built on first use; `--torch-adam` takes torch's AdamW). Every model runs eager and compiled
(`--compile`'s path: DeepSpeed's `engine.compile()`, one `torch.compile` per pipeline layer) and eager under
`--attention document` (blocks of ~48-token documents: transformers' block-causal mask per layer), each with the
largest micro-batch that fits: the largest power of two whose `train.plan` estimate stays under 85% of the
device's memory, halved after an out-of-memory error. Prints a markdown table: micro-batch, tokens/s,
TFLOP/s and MFU (`train/observe/mfu.py`'s peak table) of the median step after 3, and the peak memory the model
added beside the planner's estimate. `NAME:N` is preset NAME cut to its first N decoder layers: the mixture-of-experts
row, OLMoE-1B-7B's shape (64 experts, 8 per token) with 4 of its 16 layers (1.9B parameters, 16 bytes each with
AdamW: it fits one GPU), its MFU by active FLOPs (top-k experts only, `models/flops.py`). A row that fails prints
its error's first line and the table goes on.

`--dry-run` runs the same code on this machine's CPU with tiny models (gpt2-tiny, llama-tiny, qwen3-moe-tiny), seq 64,
micro-batch 2, 3 steps, fp32, compiled with the aot_eager backend: the test suite runs it, so that the script
is known to work before a device is lent.
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

from bench.attention_bench import packed_positions  # noqa: E402
from models.architecture import discover  # noqa: E402
from models.errors import first_line  # noqa: E402
from models.flops import flops_per_token  # noqa: E402
from models.pipeline import build_pipeline  # noqa: E402
from models.presets import resolve_model_config  # noqa: E402
from train.distributed.setup import init_distributed  # noqa: E402
from train.observe.mfu import device_name, peak_tflops, tflops_and_mfu  # noqa: E402
from train.planning.memory_model import plan_stages  # noqa: E402

GPU_CONFIG = Path(__file__).resolve().parent.parent / "ds_configs" / "gpu_bf16.json"
MICRO_BATCHES = 4  # per step; the bubble does not exist with one stage


def engine_config(micro_batch_size: int, a: argparse.Namespace) -> dict:
    optimizer = json.loads(GPU_CONFIG.read_text())["optimizer"]
    if a.torch_adam or a.dry_run:
        optimizer["params"]["torch_adam"] = True
    config = {
        "train_batch_size": micro_batch_size * MICRO_BATCHES,
        "train_micro_batch_size_per_gpu": micro_batch_size,
        "optimizer": optimizer,
        "gradient_clipping": 1.0,
        "zero_optimization": {"stage": 1},
        "steps_per_print": 10**9,
    }
    if not a.dry_run:
        config.update({"bf16": {"enabled": True}, "data_types": {"grad_accum_dtype": "fp32"}})
    return config


def largest_micro_batch(arch, a: argparse.Namespace) -> int:
    """The largest power of two (up to 64) whose planned peak fits in 85% of the device memory."""
    if a.dry_run:
        return 2
    budget = 0.85 * get_accelerator().total_memory()
    fitting = [
        size
        for size in (64, 32, 16, 8, 4, 2, 1)
        if plan_stages(arch, engine_config(size, a), stages=1, data_parallel=1, seq_len=a.seq_len, method="flops")[
            0
        ].peak
        <= budget
    ]
    return fitting[0] if fitting else 1


def train_steps(
    arch, micro_batch_size: int, compiled: bool, a: argparse.Namespace, document: bool = False
) -> tuple[list[float], float]:
    """Step times and the peak memory (GiB) the model, optimizer and activations added."""
    accelerator = get_accelerator()
    accelerator.empty_cache()
    before = accelerator.memory_allocated()
    accelerator.reset_peak_memory_stats()
    pipe = build_pipeline(arch, num_stages=1, seq_len=a.seq_len)
    config = engine_config(micro_batch_size, a)
    engine, *_ = deepspeed.initialize(model=pipe, model_parameters=pipe.parameters(), config=config)
    if compiled:
        engine.compile(backend=a.compile_backend)
    ids = torch.randint(0, arch.config.vocab_size, (micro_batch_size, a.seq_len))
    # Document attention: blocks packed with documents of ~48 tokens (bench/attention_bench.py), each layer's mask
    # built by transformers from the positions (flash attention, where configured, reads them instead).
    positions = packed_positions(micro_batch_size, a.seq_len, seed=1) if document else None
    batches = itertools.repeat(((ids, positions), ids) if document else (ids, ids))
    times = []
    try:
        for _ in range(a.steps):
            accelerator.synchronize()
            start = time.perf_counter()
            engine.train_batch(batches)
            accelerator.synchronize()
            times.append(time.perf_counter() - start)
        return times, (accelerator.max_memory_allocated() - before) / 2**30
    finally:
        engine.destroy()
        del engine, pipe
        torch._dynamo.reset()


def model_config(spec: str):
    """Preset `NAME`, or `NAME:N`: its first N decoder layers."""
    name, _, layers = spec.partition(":")
    config = resolve_model_config(name, None, None)
    if layers:
        config.num_hidden_layers = int(layers)
        if getattr(config, "layer_types", None):
            config.layer_types = config.layer_types[: int(layers)]
    return config


def bench_one(name: str, compiled: bool, a: argparse.Namespace, peak: float | None, document: bool = False) -> str:
    try:
        return _bench_one(name, compiled, a, peak, document)
    except Exception as e:  # one row's failure (a compiler error on a new family) must not lose the others
        if a.dry_run:
            raise
        return f"| {name} | {mode_name(compiled, document)} | failed: {first_line(e)} | | | | | |"


def _bench_one(name: str, compiled: bool, a: argparse.Namespace, peak: float | None, document: bool) -> str:
    arch = discover(model_config(name))
    micro_batch_size = largest_micro_batch(arch, a)
    while True:
        try:
            times, measured = train_steps(arch, micro_batch_size, compiled, a, document)
            break
        except torch.OutOfMemoryError:
            if micro_batch_size == 1:
                return f"| {name} | {mode_name(compiled, document)} | does not fit | | | | | |"
            micro_batch_size //= 2
    planned = (
        plan_stages(
            arch, engine_config(micro_batch_size, a), stages=1, data_parallel=1, seq_len=a.seq_len, method="flops"
        )[0].peak
        / 2**30
    )
    tokens_per_sec = micro_batch_size * MICRO_BATCHES * a.seq_len / statistics.median(times[3:] or times)
    perf = tflops_and_mfu(flops_per_token(arch, a.seq_len), tokens_per_sec, 1, peak)
    mfu = f"{perf['mfu']:.1%}" if perf["mfu"] is not None else "n/a"
    return (
        f"| {name} | {mode_name(compiled, document)} | {micro_batch_size} | {tokens_per_sec:,.0f} | "
        f"{perf['tflops_per_device']:.2f} | {mfu} | {times[0]:.1f} | {measured:.2f} | {planned:.2f} |"
    )


def mode_name(compiled: bool, document: bool) -> str:
    return ("compiled" if compiled else "eager") + (", document attention" if document else "")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", nargs="+", default=None, help="presets (default: gpt2-large llama-3.2-1b olmoe-1b-7b:4)")
    p.add_argument("--steps", type=int, default=12)
    p.add_argument("--seq-len", type=int, default=None, help="default 1024 (64 with --dry-run)")
    p.add_argument(
        "--compile-backend",
        default=None,
        help="torch.compile's backend (default inductor; aot_eager with --dry-run: on a CPU inductor builds C++ for "
        "every layer, a minute of the suite, and tests/integration/test_compile.py already trains through it)",
    )
    p.add_argument("--torch-adam", action="store_true", help="torch's AdamW instead of DeepSpeed's FusedAdam")
    p.add_argument("--dry-run", action="store_true", help="tiny models on this machine's CPU, fp32, 3 steps")
    a = p.parse_args()
    if a.dry_run:
        a.models, a.steps, a.seq_len = a.models or ["gpt2-tiny", "llama-tiny", "qwen3-moe-tiny"], 3, a.seq_len or 64
    a.models, a.seq_len = a.models or ["gpt2-large", "llama-3.2-1b", "olmoe-1b-7b:4"], a.seq_len or 1024
    a.compile_backend = a.compile_backend or ("aot_eager" if a.dry_run else "inductor")
    init_distributed()
    peak = None if a.dry_run else peak_tflops("bf16")
    print(
        f"device: {device_name()}, {'fp32 (dry run)' if a.dry_run else f'bf16 peak {peak} TFLOP/s'}, "
        f"torch {torch.__version__}, {MICRO_BATCHES} micro-batches a step, seq {a.seq_len}, {a.steps} steps, "
        f"compiled with {a.compile_backend}"
    )
    print("| model | mode | micro-batch | tokens/s | TFLOP/s | MFU | first step s | peak memory GiB | planned GiB |")
    print("| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
    for name in a.models:
        for compiled, document in ((False, False), (True, False), (False, True)):
            print(bench_one(name, compiled, a, peak, document), flush=True)
    # DualPipeV against 1F1B needs two pipeline ranks, each on its own device: NCCL refuses two ranks on one GPU
    # ("Duplicate GPU detected"), and a lent machine has one. On a machine with two or more, the same comparison as
    # bench.pipeline_bench's schedules table is a pair of launches: ./launch.sh --pipeline-stages 2 --schedule
    # {1f1b,dualpipev} --profile-steps N (step_time and bubble/stage* in metrics.jsonl).
    devices = get_accelerator().device_count() if not a.dry_run else 1
    print(f"DualPipeV vs 1F1B: not measured here ({devices} device; two pipeline ranks need two devices)")


if __name__ == "__main__":
    main()
