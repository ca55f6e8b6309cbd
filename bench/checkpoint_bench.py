"""Checkpoint size and save / load / export / universal-conversion time, one CPU rank (pp=1), fp32 with Adam states,
and what the content checksums cost: the XXH3-128 pass a save makes over its files (synced first) and the one a
load makes, against SHA-256 over the same files (read from the page cache: just written).

DS_ACCELERATOR=cpu python -m bench.checkpoint_bench [--models gpt2-tiny gpt2 gpt2-medium]
"""

import argparse
import hashlib
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
from train.checkpoint.manifest import file_records, tag_files, verify_contents  # noqa: E402
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
        "| model | parameters | checkpoint MB | save s | of it checksums s | load s | of it verification s "
        "| XXH3 GB/s | SHA-256 GB/s | HF export s | universal conversion s | universal MB |"
    )
    print("| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
    for name in args.models:
        config = resolve_model_config(name, None, 8192 if name.endswith("-tiny") else None)
        pipe = build_pipeline(discover(config), num_stages=1)
        engine, *_ = deepspeed.initialize(model=pipe, model_parameters=pipe.parameters(), config=DS_CONFIG)
        ids = torch.randint(0, config.vocab_size, (1, 1, 64))
        engine.train_batch(iter([(ids[0], ids[0])]))  # creates the Adam states
        root = Path(tempfile.mkdtemp())
        t0 = time.perf_counter()
        save_checkpoint(engine, root / "checkpoints", 1, client_state={}, model_config=config, keep_last=0)
        t1 = time.perf_counter()
        load_checkpoint(engine, root / "checkpoints", mode="exact")
        t2 = time.perf_counter()
        tag = root / "checkpoints" / "step_1"
        c0 = time.perf_counter()
        file_records(tag, tag_files(tag), sync=True)  # what the save spent on its checksums
        c1 = time.perf_counter()
        verify_contents(tag)  # what the load spent verifying
        c2 = time.perf_counter()
        for name_ in tag_files(tag):
            hashlib.sha256((tag / name_).read_bytes()).hexdigest()
        c3 = time.perf_counter()
        export_checkpoint(root / "checkpoints", root / "hf")
        t3 = time.perf_counter()
        export_seconds = t3 - c3
        universal = convert_to_universal(root / "checkpoints" / "step_1")
        t4 = time.perf_counter()
        size, universal_size = (
            sum(f.stat().st_size for f in d.rglob("*") if f.is_file()) / 2**20
            for d in (root / "checkpoints" / "step_1", universal)
        )
        n = sum(p.numel() for p in pipe.parameters())
        gb = size / 1024
        print(
            f"| {name} | {n / 1e6:.1f}M | {size:,.0f} | {t1 - t0:.2f} | {c1 - c0:.2f} | {t2 - t1:.2f} | "
            f"{c2 - c1:.2f} | {gb / (c2 - c1):.1f} | {gb / (c3 - c2):.1f} | {export_seconds:.2f} | {t4 - t3:.2f} "
            f"| {universal_size:,.0f} |",
            flush=True,
        )
        shutil.rmtree(root)


if __name__ == "__main__":
    main()
