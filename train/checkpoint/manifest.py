"""Checkpoint tags on disk, the leaf every checkpoint module reads: `latest`, the manifest written last (every
file and its size, the layout, the model config), verification before a load, pruning, how `--load` resumes.

A tag folder `<root>/step_<N>` is complete only once rank 0 has written `pipegpt_manifest.json` into it and
then pointed `latest` at it (write + rename), so a crash during a save leaves `latest` on the previous,
complete checkpoint. A truncated or missing file is named here instead of failing deep in torch.
"""

import json
import os
import re
import shutil
from pathlib import Path

from train.errors import ConfigError

MANIFEST = "pipegpt_manifest.json"
LATEST = "latest"


def latest_tag(root: Path) -> str | None:
    path = root / LATEST
    return path.read_text().strip() if path.is_file() else None


def write_atomically(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def write_manifest(tag_dir: Path, manifest: dict) -> None:
    """Every file below `tag_dir` and its size, written last: a folder without it is incomplete."""
    files = {str(p.relative_to(tag_dir)): p.stat().st_size for p in sorted(tag_dir.rglob("*")) if p.is_file()}
    files.pop(MANIFEST, None)
    write_atomically(tag_dir / MANIFEST, json.dumps({**manifest, "files": files}, indent=1))


def prune(root: Path, keep_last: int) -> None:
    """Keep the newest `keep_last` complete checkpoints (with their universal conversions)."""
    tags = sorted(
        (p for p in root.glob("step_*") if re.fullmatch(r"step_\d+", p.name) and (p / MANIFEST).exists()),
        key=lambda p: int(p.name[5:]),
    )
    for old in tags[:-keep_last] if keep_last > 0 else []:
        for folder in root.glob(f"{old.name}_*"):
            shutil.rmtree(folder, ignore_errors=True)
        shutil.rmtree(old, ignore_errors=True)


def verified_tag_dir(load: Path) -> Path:
    """The checkpoint folder to load: `load` itself if it is a tag, else the one `latest` names; checked."""
    if (tag := latest_tag(load)) is not None:
        tag_dir = load / tag
    elif (load / MANIFEST).exists() or any(load.glob("*model_states.pt")):
        tag_dir = load
    else:
        raise ConfigError(f"{load} holds no checkpoint (no `{LATEST}` file, no model states)")
    if not (tag_dir / MANIFEST).exists():
        raise ConfigError(f"checkpoint {tag_dir} is incomplete: {MANIFEST} is missing (the save did not finish)")
    manifest = json.loads((tag_dir / MANIFEST).read_text())
    for name, size in manifest["files"].items():
        path = tag_dir / name
        if not path.exists():
            raise ConfigError(f"checkpoint {tag_dir} is missing {name}; resume from an earlier tag")
        if path.stat().st_size != size:
            raise ConfigError(f"checkpoint file {path} is corrupt ({path.stat().st_size} bytes, expected {size})")
    return tag_dir


def read_manifest(tag_dir: Path) -> dict:
    return json.loads((tag_dir / MANIFEST).read_text())


def is_universal(tag_dir: Path) -> bool:
    """A folder in DeepSpeed's universal form (`zero/<param>/...`), made by train/checkpoint/universal.py."""
    return (tag_dir / "zero").is_dir()


def resume_mode(load: Path, reset_optimizer: bool, layout: dict) -> str:
    """How `--load` resumes a run of `layout`: "exact" (the same layout: weights, optimizer, LR schedule, RNG,
    data position, dropout seeds), "universal" (another layout: the same through DeepSpeed's universal
    checkpoint, but dropout masks and reduction order differ) or "weights" (--reset-optimizer)."""
    tag_dir = verified_tag_dir(load)
    if reset_optimizer:
        return "weights"
    return "universal" if is_universal(tag_dir) or read_manifest(tag_dir)["layout"] != layout else "exact"
