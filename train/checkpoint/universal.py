"""DeepSpeed's universal checkpoint: resume on another number of stages or replicas with the full optimizer state.

A native checkpoint holds ZeRO's optimizer shards as partitioned for its layout. DeepSpeed's own converter,
`deepspeed.checkpoint.ds_to_universal`, rewrites them per parameter (`zero/<name>/{fp32,exp_avg,exp_avg_sq,
step}.pt`), and an engine built with `"checkpoint": {"load_universal": true}` loads that folder into any
layout. With cut layers (`--tensor-parallel`) every parameter's slices are declared in the client state, so the
converter joins them and a run of any tensor-parallel size cuts them again (models/tensor_parallel_universal.py).
pipegpt converts on demand, once, into `<tag>_universal` beside the native tag: the conversion writes
into a temporary folder that becomes `<tag>_universal` only when complete, with its own manifest, so a crash
mid-conversion leaves nothing that could be loaded. ZeRO stage 1 or 2 is needed (stage 0 keeps no shards).
"""

import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import torch.distributed as dist
from deepspeed.checkpoint.constants import UNIVERSAL_CHECKPOINT_VERSION_KEY, UNIVERSAL_CHECKPOINT_VERSION_VALUE
from deepspeed.runtime.pipe.engine import PipelineEngine

from models.tensor_parallel_universal import slice_layout, universal_checkpoint_patterns
from train.checkpoint.manifest import is_universal, read_manifest, verified_tag_dir, write_manifest
from train.errors import ConfigError

SUFFIX = "_universal"
# A manifest entry: the saving run declared how its tensor-parallel slices join (`universal_checkpoint_info`); a
# checkpoint with slices saved before it would be joined wrongly by the converter.
SLICES_DECLARED = "tensor_parallel_slices_declared"


def universal_checkpoint_info(engine: PipelineEngine) -> dict:
    """The version DeepSpeed's converter requires and, with cut layers, how each parameter of every stage joins
    (models/tensor_parallel_universal.py; a collective: rank 0 writes `mp_rank_00`, which the converter reads)."""
    info = {UNIVERSAL_CHECKPOINT_VERSION_KEY: UNIVERSAL_CHECKPOINT_VERSION_VALUE}
    size = engine.grid.get_slice_parallel_world_size()
    if size <= 1:
        return info
    layouts: list[dict | None] = [None] * dist.get_world_size()
    dist.all_gather_object(layouts, slice_layout(engine.module))
    return {**info, **universal_checkpoint_patterns({k: v for lay in layouts for k, v in lay.items()}, size)}


def convert_to_universal(tag_dir: Path) -> Path:
    """The universal form of the verified checkpoint `tag_dir` (itself when it already is one), converted once."""
    if is_universal(tag_dir):
        return tag_dir
    out = tag_dir.with_name(tag_dir.name + SUFFIX)
    if out.exists():
        return verified_tag_dir(out)
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    print(f"converting {tag_dir} into a universal checkpoint {out} (DeepSpeed's ds_to_universal)", flush=True)
    start = time.perf_counter()
    command = [
        sys.executable,
        "-m",
        "deepspeed.checkpoint.ds_to_universal",
        "--input_folder",
        str(tag_dir),
        "--output_folder",
        str(tmp),
        "--num_extract_workers",
        "1",
        "--num_merge_workers",
        "1",
    ]
    done = subprocess.run(command, capture_output=True, text=True)
    if done.returncode != 0:
        last = (done.stderr.strip().splitlines() or ["no output"])[-1]
        raise ConfigError(
            f"cannot convert {tag_dir} into a universal checkpoint ({last}); DeepSpeed needs ZeRO "
            "stage 1 or 2 in the saving run; pass --reset-optimizer to load the weights only"
        )
    write_manifest(tmp, {**read_manifest(tag_dir), "universal_of": tag_dir.name})
    os.replace(tmp, out)
    size = sum(p.stat().st_size for p in out.rglob("*") if p.is_file())
    print(f"universal checkpoint {out}: {size / 2**20:,.0f} MB in {time.perf_counter() - start:.1f} s", flush=True)
    return out
