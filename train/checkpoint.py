"""Checkpoints through DeepSpeed's `save_checkpoint`, made crash-safe, resumable and exportable.

A tag folder `<root>/step_<N>` is written by DeepSpeed on every rank; only when all ranks
are done does rank 0 write `pipegpt_manifest.json` (every file and its size, the layout,
the model config) and then point `latest` at it (write + rename). A crash during a save
therefore leaves `latest` on the previous, complete checkpoint. Loading checks the
manifest first, so a truncated or missing file is named instead of failing deep in torch.
"""

import json
import os
import random
import re
import shutil
import time
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch
import torch.distributed as dist
from deepspeed.checkpoint.constants import (
    UNIVERSAL_CHECKPOINT_INFO,
    UNIVERSAL_CHECKPOINT_VERSION_KEY,
    UNIVERSAL_CHECKPOINT_VERSION_VALUE,
)
from deepspeed.runtime.pipe.engine import PipelineEngine
from transformers import PretrainedConfig

from models.deepspeed_internals import layer_seed_offset, restore_layer_seed_offset
from train.errors import EXIT_ERROR, ConfigError, every_rank, rank_zero_first
from train.faults import inject_fault

if TYPE_CHECKING:  # run_config imports this module
    from train.run_config import RunConfig

MANIFEST = "pipegpt_manifest.json"
LATEST = "latest"


def layout_of(engine: PipelineEngine) -> dict:
    return {"pipeline_stages": engine.num_stages, "data_parallel": engine.grid.data_parallel_size}


def rng_state() -> dict:
    return {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate()}


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    np.random.set_state(state["numpy"])
    random.setstate(state["python"])


def latest_tag(root: Path) -> str | None:
    path = root / LATEST
    return path.read_text().strip() if path.is_file() else None


def _write_atomically(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def save_checkpoint(
    engine: PipelineEngine, root: Path, step: int, client_state: dict, model_config: PretrainedConfig, keep_last: int
) -> Path:
    """Save step `step` under `root/step_<step>`; make it `latest` only once every rank has written it."""
    tag = f"step_{step}"
    every_rank(lambda: _probe_writable(root / tag))  # fail together, before DeepSpeed starts writing
    state = {
        **client_state,
        "step": step,
        "layout": layout_of(engine),
        "rng": rng_state(),
        "layer_seed_offset": layer_seed_offset(engine.module),
        # What DeepSpeed's ds_to_universal requires to convert the checkpoint (train/universal_checkpoint.py).
        UNIVERSAL_CHECKPOINT_INFO: {UNIVERSAL_CHECKPOINT_VERSION_KEY: UNIVERSAL_CHECKPOINT_VERSION_VALUE},
    }
    inject_fault(f"save:{tag}", lambda: engine.module.save_state_dict(str(root / tag), engine.checkpoint_engine))
    try:
        engine.save_checkpoint(str(root), tag=tag, client_state=state, save_latest=False)
    except OSError as e:
        # Peers may be inside DeepSpeed's collectives, so no agreement is possible: exit hard, and the
        # launcher stops them all.
        print(f"error: writing checkpoint {root / tag} failed: {e}; `latest` still names the previous one", flush=True)
        os._exit(EXIT_ERROR)
    dist.barrier()
    if dist.get_rank() == 0:
        write_manifest(root / tag, {"step": step, "layout": layout_of(engine), "model_config": model_config.to_dict()})
        _write_atomically(root / LATEST, tag)
        prune(root, keep_last)
    dist.barrier()
    return root / tag


def _probe_writable(tag_dir: Path) -> None:
    try:
        tag_dir.mkdir(parents=True, exist_ok=True)
        probe = tag_dir / f".write_probe_{dist.get_rank()}"
        probe.write_text("ok")
        probe.unlink()
    except OSError as e:
        raise ConfigError(
            f"cannot write checkpoint to {tag_dir}: {e.strerror}; the previous checkpoint is kept"
        ) from None


class Checkpointer:
    """Saves on its schedule (every `--save-interval` steps and at the last step) and remembers the newest
    complete checkpoint, which the export reads."""

    def __init__(
        self,
        engine: PipelineEngine,
        root: Path,
        model_config: PretrainedConfig,
        config: "RunConfig",
        client_state: dict,
    ):
        """`config`: the RunConfig (save interval, checkpoints kept, global batch); `client_state`: saved as is."""
        self.engine, self.root, self.model_config, self.client_state = engine, root, model_config, client_state
        self.interval, self.keep_last = config.flags.save_interval, config.flags.keep_last
        self.samples_per_step = config.batch.global_batch
        self.last_saved: Path | None = None
        self.last_save_seconds = 0.0

    def save(self, step: int, last_step: bool) -> None:
        if not last_step and not (self.interval and step % self.interval == 0):
            return
        state = {"consumed_samples": step * self.samples_per_step, **self.client_state}
        start = time.perf_counter()
        self.last_saved = save_checkpoint(self.engine, self.root, step, state, self.model_config, self.keep_last)
        self.last_save_seconds = time.perf_counter() - start

    def latest_tag(self) -> str | None:
        return latest_tag(self.root)


def write_manifest(tag_dir: Path, manifest: dict) -> None:
    """Every file below `tag_dir` and its size, written last: a folder without it is incomplete."""
    files = {str(p.relative_to(tag_dir)): p.stat().st_size for p in sorted(tag_dir.rglob("*")) if p.is_file()}
    files.pop(MANIFEST, None)
    _write_atomically(tag_dir / MANIFEST, json.dumps({**manifest, "files": files}, indent=1))


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


def resume_mode(load: Path, reset_optimizer: bool, layout: dict) -> str:
    """How `--load` resumes a run of `layout`: "exact" (the same layout: weights, optimizer, LR schedule, RNG,
    data position, dropout seeds), "universal" (another layout: the same through DeepSpeed's universal
    checkpoint, but dropout masks and reduction order differ) or "weights" (--reset-optimizer)."""
    tag_dir = verified_tag_dir(load)
    if reset_optimizer:
        return "weights"
    return "universal" if (tag_dir / "zero").is_dir() or read_manifest(tag_dir)["layout"] != layout else "exact"


def load_checkpoint(engine: PipelineEngine, load: Path, mode: str) -> dict:
    """Restore the checkpoint as `resume_mode` decided; returns the client state (its step first of all)."""
    from train.universal_checkpoint import convert_to_universal

    tag_dir = verified_tag_dir(load)
    if mode == "universal":
        tag_dir = rank_zero_first(lambda: convert_to_universal(tag_dir))
    elif mode == "weights" and (tag_dir / "zero").is_dir():
        tag_dir = verified_tag_dir(tag_dir.parent / read_manifest(tag_dir)["universal_of"])
    try:
        if mode != "weights":
            _, client_state = engine.load_checkpoint(str(tag_dir.parent), tag=tag_dir.name)
            set_rng_state(client_state["rng"])
            if mode == "exact" and "layer_seed_offset" in client_state:  # dropout masks continue where they were
                restore_layer_seed_offset(engine.module, client_state["layer_seed_offset"])
            return client_state
        # Weights only: the per-layer files are layout-independent; DeepSpeed's fp32 copies follow them.
        engine.module.load_state_dir(str(tag_dir), checkpoint_engine=engine.checkpoint_engine)
        if hasattr(engine.optimizer, "refresh_fp32_params"):
            engine.optimizer.refresh_fp32_params()
    except (RuntimeError, OSError, KeyError, AssertionError) as e:
        raise ConfigError(f"cannot load checkpoint {tag_dir}: {str(e).splitlines()[0]}") from None
    state = torch.load(next(tag_dir.glob("mp_rank_00_model_states.pt")), map_location="cpu", weights_only=False)
    client_state = {k: state[k] for k in ("step", "consumed_samples", "wandb_run_id", "lr_scheduler") if k in state}
    if engine.lr_scheduler is not None and "lr_scheduler" in client_state:
        engine.lr_scheduler.load_state_dict(client_state["lr_scheduler"])
    engine.global_steps = client_state["step"]
    return client_state
