"""Checkpoint size and save / load / export / universal-conversion time, one CPU rank (pp=1), fp32 with Adam states.

DS_ACCELERATOR=cpu python -m bench.checkpoint_bench [--models gpt2-tiny gpt2]
"""

import argparse
import os
import shutil
import tempfile
import time
from pathlib import Path

os.environ.setdefault("DS_ACCELERATOR", "cpu")
os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1", MASTER_PORT="29533")

import deepspeed  # noqa: E402
import torch  # noqa: E402

from models.architecture import discover  # noqa: E402
from models.pipeline import build_pipeline  # noqa: E402
from models.presets import resolve_model_config  # noqa: E402
from train.checkpoint.checkpointer import load_checkpoint, save_checkpoint  # noqa: E402
from train.checkpoint.universal import convert_to_universal  # noqa: E402
from train.distributed.setup import init_distributed  # noqa: E402
from train.export import export_checkpoint  # noqa: E402

DS_CONFIG = {
    "train_batch_size": 1,
    "train_micro_batch_size_per_gpu": 1,
    "optimizer": {"type": "AdamW", "params": {"lr": 1e-4, "torch_adam": True}},
    "zero_optimization": {"stage": 1},
    "steps_per_print": 10**9,
}


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--models", nargs="+", default=["gpt2-tiny", "gpt2"])
    args = p.parse_args()
    init_distributed()
    print(
        "| model | parameters | checkpoint MB | save s | load s | HF export s | universal conversion s | universal MB |"
    )
    print("| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
    for name in args.models:
        config = resolve_model_config(name, None, 8192 if name.endswith("-tiny") else None)
        pipe = build_pipeline(discover(config), num_stages=1)
        engine, *_ = deepspeed.initialize(model=pipe, model_parameters=pipe.parameters(), config=DS_CONFIG)
        ids = torch.randint(0, config.vocab_size, (1, 1, 64))
        engine.train_batch(iter([(ids[0], ids[0])]))  # creates the Adam states
        root = Path(tempfile.mkdtemp())
        t0 = time.perf_counter()
        save_checkpoint(engine, root / "checkpoints", 1, {}, config, keep_last=0)
        t1 = time.perf_counter()
        load_checkpoint(engine, root / "checkpoints", mode="exact")
        t2 = time.perf_counter()
        export_checkpoint(root / "checkpoints", root / "hf")
        t3 = time.perf_counter()
        universal = convert_to_universal(root / "checkpoints" / "step_1")
        t4 = time.perf_counter()
        size, universal_size = (
            sum(f.stat().st_size for f in d.rglob("*") if f.is_file()) / 2**20
            for d in (root / "checkpoints" / "step_1", universal)
        )
        n = sum(p.numel() for p in pipe.parameters())
        print(
            f"| {name} | {n / 1e6:.1f}M | {size:,.0f} | {t1 - t0:.2f} | {t2 - t1:.2f} | {t3 - t2:.2f} "
            f"| {t4 - t3:.2f} | {universal_size:,.0f} |",
            flush=True,
        )
        shutil.rmtree(root)


if __name__ == "__main__":
    main()
