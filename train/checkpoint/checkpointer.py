"""Checkpoints through DeepSpeed's `save_checkpoint`, made crash-safe and resumable.

Every rank writes its part of the tag through DeepSpeed; only when all ranks are done does rank 0 write the
manifest and move `latest` (train/checkpoint/manifest.py). Loading verifies the manifest first, then restores
what `resume_mode` decided: the same layout exactly, another layout through DeepSpeed's universal checkpoint
(train/checkpoint/universal.py), or the weights alone.
"""

import errno
import os
import random
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from deepspeed.checkpoint.constants import UNIVERSAL_CHECKPOINT_INFO
from deepspeed.runtime.pipe.engine import PipelineEngine
from transformers import PretrainedConfig, PreTrainedTokenizerBase

from models.architecture import discover
from models.deepspeed_internals import (
    layer_seed_offset,
    load_layer_files,
    restore_layer_seed_offset,
    save_layer_files,
    set_global_steps,
)
from models.hf_weights import config_from_dict
from models.portable import make_portable, max_positions
from models.tensor_parallel_stage import resliced_layer_state
from train.checkpoint.manifest import (
    LATEST,
    MANIFEST,
    file_records,
    is_universal,
    latest_tag,
    layout_of,
    prune,
    read_manifest,
    saved_layout,
    tag_files,
    verified_tag_dir,
    verify_contents,
    write_atomically,
    write_manifest,
)
from train.checkpoint.same_run import TOKENIZER_DIR
from train.checkpoint.universal import SLICES_DECLARED, convert_to_universal, universal_checkpoint_info
from train.distributed.agreement import every_rank, rank_zero_first
from train.distributed.faults import inject_fault
from train.errors import EXIT_ERROR, ConfigError, RunError, first_line


def engine_layout(engine: PipelineEngine) -> dict:
    return layout_of(engine.num_stages, engine.grid.data_parallel_size, engine.module.SCHEDULE,
                     engine.grid.get_slice_parallel_world_size())  # fmt: skip


def rng_state() -> dict:
    return {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate()}


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    np.random.set_state(state["numpy"])
    random.setstate(state["python"])


def save_checkpoint(
    engine: PipelineEngine,
    root: Path,
    step: int,
    *,
    client_state: dict,
    model_config: PretrainedConfig,
    keep_last: int,
    adapters_only: bool = False,
    manifest: dict | None = None,
    tokenizer: PreTrainedTokenizerBase | None = None,
) -> Path:
    """Save step `step` under `root/step_<step>`; make it `latest` only once every rank has written it.
    `adapters_only` (LoRA): the frozen base weights are left out, `--model` holds them; `manifest`: more entries
    for the manifest (the adapters and the base model they belong to)."""
    tag = f"step_{step}"
    every_rank(lambda: check_free_space(root, tag), run_here=dist.get_rank() == 0)  # before anything is created
    every_rank(lambda: _probe_writable(root / tag))  # fail together, before DeepSpeed starts writing
    state = {
        **client_state,
        "step": step,
        "layout": engine_layout(engine),
        "rng": rng_state(),
        "layer_seed_offset": layer_seed_offset(engine.module),
        # What DeepSpeed's ds_to_universal requires to convert the checkpoint (train/checkpoint/universal.py).
        UNIVERSAL_CHECKPOINT_INFO: universal_checkpoint_info(engine),
    }
    inject_fault(
        f"save:{tag}",
        lambda: save_layer_files(engine, root / tag, adapters_only),
    )
    try:
        engine.save_checkpoint(
            str(root), tag=tag, client_state=state, save_latest=False, exclude_frozen_parameters=adapters_only
        )
    except Exception as e:  # a full disk is a RuntimeError from torch.save ("file write failed"), not an OSError
        abandon_save(root, tag, e)
    if tokenizer is not None and dist.get_rank() == 0:  # the checkpoint is self-contained: --load and export read it
        tokenizer.save_pretrained(root / tag / TOKENIZER_DIR)
        make_portable(root / tag / TOKENIZER_DIR, context=max_positions(model_config.to_dict()))
    dist.barrier()
    records = checksums_of_every_rank(root / tag)
    if dist.get_rank() == 0:
        entries = {
            "step": step,
            "layout": engine_layout(engine),
            "model_config": model_config.to_dict(),
            **({SLICES_DECLARED: True} if engine.grid.get_slice_parallel_world_size() > 1 else {}),
            **(manifest or {}),
        }
        write_manifest(root / tag, entries, records)
        write_atomically(root / LATEST, tag)
        prune(root, keep_last, saved=step)
    dist.barrier()
    return root / tag


def abandon_save(root: Path, tag: str, error: Exception) -> None:
    """A save that failed on this rank: remove the partial tag and exit hard. Peers may be inside DeepSpeed's
    collectives, so no agreement is possible; the launcher stops them all (their writes into the removed folder
    fail too). Every failing rank prints the line: the same words on each when the disk is full (the usual cause)."""
    full = isinstance(error, OSError) and error.errno == errno.ENOSPC or shutil.disk_usage(root).free < 2**26
    reason = "its file system is full" if full else first_line(error)
    shutil.rmtree(root / tag, ignore_errors=True)
    print(
        f"error: writing checkpoint {root / tag} failed ({reason}); the partial {tag} was removed and "
        f"`{LATEST}` still names {latest_tag(root) or 'no checkpoint'}: free space or pass an --output-dir with "
        "room, then --load it",
        flush=True,
    )
    os._exit(EXIT_ERROR)


def checksums_of_every_rank(tag_dir: Path) -> dict[str, dict]:
    """Every rank syncs and checksums a share of the tag's files (all ranks list the same folder); a collective
    that returns all the records on every rank."""
    names, world = tag_files(tag_dir), dist.get_world_size()
    shares: list[dict | None] = [None] * world
    dist.all_gather_object(shares, file_records(tag_dir, names[dist.get_rank() :: world], sync=True))
    return {name: record for share in shares for name, record in share.items()}


def check_free_space(root: Path, tag: str) -> None:
    """Room for another checkpoint as large as the newest complete one (the older ones are pruned only after)."""
    newest = latest_tag(root)
    if newest is None or not (root / newest / MANIFEST).is_file():
        return
    files = read_manifest(root / newest)["files"].values()
    needed = sum(record["size"] if isinstance(record, dict) else record for record in files)
    free = shutil.disk_usage(root).free
    if free < needed:
        raise RunError(
            f"not enough space for checkpoint {root / tag}: {needed / 2**20:,.0f} MB needed (the size of {newest}), "
            f"{free / 2**20:,.0f} MB free; free space (or lower --keep-last), then --load {root}: {newest} is complete"
        )


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


@dataclass(kw_only=True)
class Checkpointer:
    """Saves on its schedule (every `interval` steps, 0: never, and at the last step) and remembers the newest
    complete checkpoint, which the export reads. `client_state` is saved as it is."""

    engine: PipelineEngine
    root: Path
    model_config: PretrainedConfig
    interval: int
    keep_last: int
    samples_per_step: int
    client_state: dict = field(default_factory=dict)
    # --streaming: the stream's position after a step, as rank 0 (a data-reading rank) knows it; every rank saves it
    stream_position: Callable[[int], dict] | None = None
    adapters_only: bool = False  # LoRA: the frozen base is not saved
    tokenizer: PreTrainedTokenizerBase | None = None  # saved in every tag
    manifest: dict = field(default_factory=dict)  # more manifest entries (the adapters, their base model)
    last_saved: Path | None = None
    last_save_seconds: float = 0.0

    def save(self, step: int, last_step: bool) -> None:
        if not last_step and not (self.interval and step % self.interval == 0):
            return
        state = {"consumed_samples": step * self.samples_per_step, **self.client_state}
        if self.stream_position is not None:
            position = [self.stream_position(step) if dist.get_rank() == 0 else None]
            dist.broadcast_object_list(position, src=0)
            state["stream_position"] = position[0]
        start = time.perf_counter()
        self.last_saved = save_checkpoint(
            self.engine,
            self.root,
            step,
            client_state=state,
            model_config=self.model_config,
            keep_last=self.keep_last,
            adapters_only=self.adapters_only,
            manifest=self.manifest,
            tokenizer=self.tokenizer,
        )
        self.last_save_seconds = time.perf_counter() - start

    def latest_tag(self) -> str | None:
        """The newest complete checkpoint under `root`, this run's or an earlier one's."""
        return latest_tag(self.root)


def verify_on_every_rank(tag_dir: Path) -> None:
    """Every rank checks the checksums of a share of the tag's files; a damaged file stops every rank with one
    line naming it."""
    every_rank(lambda: verify_contents(tag_dir, dist.get_rank(), dist.get_world_size()))


def _reslicer(engine: PipelineEngine, tag_dir: Path) -> Callable | None:
    """How a layer's state is built from a checkpoint of another tensor-parallel size (its slices joined and cut
    for this slice rank, by the plan of the model it records); None for the same size."""
    rank, size = engine.grid.get_slice_parallel_rank(), engine.grid.get_slice_parallel_world_size()
    if saved_layout(tag_dir)["tensor_parallel"] == size:
        return None
    arch = discover(config_from_dict(read_manifest(tag_dir)["model_config"]))
    return lambda index, paths: resliced_layer_state(paths, arch, index, rank, size)


def load_checkpoint(engine: PipelineEngine, load: Path, mode: str, adapters_only: bool = False) -> dict:
    """Restore the checkpoint as `resume_mode` decided; returns the client state (its step first of all).
    `adapters_only`: a LoRA checkpoint, whose layer files hold the adapters (the base came from --model)."""
    tag_dir = verified_tag_dir(load)
    verify_on_every_rank(tag_dir)
    if mode == "universal" and not is_universal(tag_dir):
        tag_dir = rank_zero_first(lambda: convert_to_universal(tag_dir))
        verify_on_every_rank(tag_dir)  # a conversion left by an earlier run may have been damaged since
    elif mode == "weights" and is_universal(tag_dir):
        tag_dir = verified_tag_dir(tag_dir.parent / read_manifest(tag_dir)["universal_of"])
        verify_on_every_rank(tag_dir)
    try:
        inject_fault("empty-error:checkpoint", raises=AssertionError)
        if mode != "weights":
            _, client_state = engine.load_checkpoint(
                str(tag_dir.parent), tag=tag_dir.name, load_module_strict=not adapters_only
            )
            set_rng_state(client_state["rng"])
            if mode == "exact" and "layer_seed_offset" in client_state:  # dropout masks continue where they were
                restore_layer_seed_offset(engine.module, client_state["layer_seed_offset"])
            return client_state
        # Weights only: the per-layer files are layout-independent but for the slices of cut layers (re-cut when the
        # tensor-parallel size differs); DeepSpeed's fp32 copies follow them.
        load_layer_files(engine, tag_dir, strict=not adapters_only, state_of=_reslicer(engine, tag_dir))
        if hasattr(engine.optimizer, "refresh_fp32_params"):
            engine.optimizer.refresh_fp32_params()
    except (RuntimeError, OSError, KeyError, AssertionError) as e:
        raise ConfigError(f"cannot load checkpoint {tag_dir}: {first_line(e)}") from None
    state = torch.load(next(tag_dir.glob("mp_rank_00_model_states.pt")), map_location="cpu", weights_only=False)
    kept = ("step", "consumed_samples", "wandb_run_id", "lr_scheduler", "stream_position")
    client_state = {k: state[k] for k in kept if k in state}
    if engine.lr_scheduler is not None and "lr_scheduler" in client_state:
        engine.lr_scheduler.load_state_dict(client_state["lr_scheduler"])
    set_global_steps(engine, client_state["step"])
    return client_state
