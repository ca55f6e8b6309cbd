"""Checkpoint tags on disk, the leaf every checkpoint module reads: `latest`, the manifest written last (every
file, its size and a checksum of its content, the layout, the model config), verification before a load,
pruning, how `--load` resumes.

A tag folder `<root>/step_<N>` is complete only once rank 0 has written `pipegpt_manifest.json` into it and
then pointed `latest` at it (write + rename), so a crash during a save leaves `latest` on the previous,
complete checkpoint. A truncated or missing file is named here instead of failing deep in torch (sizes: a
moment), and so is a file whose bytes changed (the checksum: the files are read once, by every rank a share).

The checksum is xxHash's XXH3-128: 19 GB/s on this CPU from memory against 1.4 for SHA-256 and 2.9 for CRC-32
(bench.checkpoint_bench measures it on checkpoint files), so reading the files is the cost, not hashing them. It
finds accidents (a torn write, a zeroed page, bit rot), not tampering.
"""

import json
import os
import re
import shutil
from pathlib import Path

import xxhash

from train.errors import ConfigError

MANIFEST = "pipegpt_manifest.json"
LATEST = "latest"
CHECKSUM = "xxh3_128"
CHUNK = 8 * 2**20


def latest_tag(root: Path) -> str | None:
    path = root / LATEST
    return path.read_text().strip() if path.is_file() else None


def write_atomically(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def tag_files(tag_dir: Path) -> list[str]:
    """The files of a tag folder (the manifest aside), sorted: the same list on every rank."""
    names = (str(p.relative_to(tag_dir)) for p in sorted(tag_dir.rglob("*")) if p.is_file())
    return [name for name in names if name != MANIFEST and not name.endswith(".tmp")]


def file_checksum(path: Path, sync: bool = False) -> str:
    """XXH3-128 of the file's bytes; `sync`: flush them to the disk first (a manifest vouches for synced data)."""
    digest = xxhash.xxh3_128()
    with open(path, "rb") as f:
        if sync:
            os.fsync(f.fileno())
        while chunk := f.read(CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def file_records(tag_dir: Path, names: list[str], sync: bool = False) -> dict[str, dict]:
    """{name: {"size", CHECKSUM}} of `names` in `tag_dir` (one rank's share when the ranks split the work)."""
    return {
        name: {"size": (tag_dir / name).stat().st_size, CHECKSUM: file_checksum(tag_dir / name, sync)} for name in names
    }


def write_manifest(tag_dir: Path, manifest: dict, records: dict[str, dict] | None = None) -> None:
    """Every file below `tag_dir`, its size and checksum, written last: a folder without it is incomplete.
    `records`: the files' records as the ranks computed them (else computed here, by this process)."""
    records = records if records is not None else file_records(tag_dir, tag_files(tag_dir), sync=True)
    write_atomically(tag_dir / MANIFEST, json.dumps({**manifest, "files": dict(sorted(records.items()))}, indent=1))


def prune(root: Path, keep_last: int, saved: int) -> None:
    """Keep the newest `keep_last` complete checkpoints up to step `saved` (just saved), with their universal
    conversions. Tags of later steps belong to an earlier run in the same folder: they are left alone, and never
    count against the run that is saving (which would lose its own newest checkpoint)."""
    tags = sorted(
        (p for p in root.glob("step_*") if re.fullmatch(r"step_\d+", p.name) and (p / MANIFEST).exists()),
        key=lambda p: int(p.name[5:]),
    )
    tags = [tag for tag in tags if int(tag.name[5:]) <= saved]
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
    manifest = read_manifest(tag_dir)
    for name, record in manifest["files"].items():
        path, size = tag_dir / name, record["size"] if isinstance(record, dict) else record  # older: sizes only
        if not path.exists():
            raise ConfigError(f"checkpoint {tag_dir} is missing {name}; {earlier_tag_hint(tag_dir)}")
        if path.stat().st_size != size:
            raise ConfigError(
                f"checkpoint file {path} is corrupt ({path.stat().st_size} bytes, expected {size}); "
                f"{earlier_tag_hint(tag_dir)}"
            )
    return tag_dir


def verify_contents(tag_dir: Path, share: int = 0, shares: int = 1) -> None:
    """Check the checksum of every `shares`-th file of a verified tag, from the `share`-th (the ranks of a job
    split the reading); a ConfigError names the first file whose bytes differ from what was saved."""
    files = read_manifest(tag_dir)["files"]
    for name in sorted(files)[share::shares]:
        expected = files[name].get(CHECKSUM) if isinstance(files[name], dict) else None
        if expected is not None and file_checksum(tag_dir / name) != expected:
            raise ConfigError(
                f"checkpoint file {tag_dir / name} differs from what was saved (its {CHECKSUM} checksum does not "
                f"match the manifest): the file is damaged; {earlier_tag_hint(tag_dir)}"
            )


def earlier_tag_hint(tag_dir: Path) -> str:
    """The fix for a damaged tag: the newest complete one before it, if there is one."""
    step = re.fullmatch(r"step_(\d+)(_universal)?", tag_dir.name)
    earlier = sorted(
        (int(p.name[5:]), p)
        for p in tag_dir.parent.glob("step_*")
        if re.fullmatch(r"step_\d+", p.name)
        and (p / MANIFEST).exists()
        and (not step or int(p.name[5:]) < int(step[1]))
    )
    if earlier:
        return f"resume from an earlier checkpoint: --load {earlier[-1][1]}"
    return "no earlier checkpoint is left: start without --load (or from --model)"


def read_manifest(tag_dir: Path) -> dict:
    try:
        manifest = json.loads((tag_dir / MANIFEST).read_text())
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ConfigError(
            f"checkpoint manifest {tag_dir / MANIFEST} is unreadable ({type(e).__name__}): the save did not finish "
            f"or the file is damaged; {earlier_tag_hint(tag_dir)}"
        ) from None
    if not isinstance(manifest, dict) or not isinstance(manifest.get("files"), dict):
        raise ConfigError(f"checkpoint manifest {tag_dir / MANIFEST} lists no files; {earlier_tag_hint(tag_dir)}")
    return manifest


def is_universal(tag_dir: Path) -> bool:
    """A folder in DeepSpeed's universal form (`zero/<param>/...`), made by train/checkpoint/universal.py."""
    return (tag_dir / "zero").is_dir()


def layout_of(pipeline_stages: int, data_parallel: int, schedule: str, tensor_parallel: int = 1) -> dict:
    """The layout a checkpoint records: its optimizer shards fit only the same ranks holding the same layers."""
    return {
        "pipeline_stages": pipeline_stages,
        "data_parallel": data_parallel,
        "schedule": schedule,
        "tensor_parallel": tensor_parallel,
    }


def saved_layout(tag_dir: Path) -> dict:
    """The layout a checkpoint recorded (older ones: 1F1B before --schedule, one rank a layer before
    --tensor-parallel)."""
    return {"schedule": "1f1b", "tensor_parallel": 1} | read_manifest(tag_dir)["layout"]


def resume_mode(load: Path, reset_optimizer: bool, layout: dict) -> str:
    """How `--load` resumes a run of `layout`: "exact" (the same layout: weights, optimizer, LR schedule, RNG,
    data position, dropout seeds), "universal" (another layout: the same through DeepSpeed's universal
    checkpoint, but dropout masks and reduction order differ) or "weights" (--reset-optimizer)."""
    tag_dir = verified_tag_dir(load)
    if reset_optimizer:
        return "weights"
    return "universal" if is_universal(tag_dir) or saved_layout(tag_dir) != layout else "exact"
