"""DeepSpeed's universal checkpoint: resume on another number of stages or replicas with the full optimizer state.

A native checkpoint holds ZeRO's optimizer shards as partitioned for its layout. DeepSpeed's own converter,
`deepspeed.checkpoint.ds_to_universal`, rewrites them per parameter (`zero/<name>/{fp32,exp_avg,exp_avg_sq,
step}.pt`), and an engine built with `"checkpoint": {"load_universal": true}` loads that folder into any
layout. pipegpt converts on demand, once, into `<tag>_universal` beside the native tag: the conversion writes
into a temporary folder that becomes `<tag>_universal` only when complete, with its own manifest, so a crash
mid-conversion leaves nothing that could be loaded. ZeRO stage 1 or 2 is needed (stage 0 keeps no shards).
"""

import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

from train.checkpoint.manifest import is_universal, read_manifest, verified_tag_dir, write_manifest
from train.errors import ConfigError

SUFFIX = "_universal"


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
