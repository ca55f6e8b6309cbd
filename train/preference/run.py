"""Preference training's part of a run (`--data-format preference`): the loss function the pipeline is built with,
the reference table it reads (computed before step 1, or read back on resume: train/preference/reference.py), and TRL's
metrics gathered from the last stage for the log."""

import time
from pathlib import Path

import torch
import torch.distributed as dist
from deepspeed.accelerator import get_accelerator
from deepspeed.runtime.pipe.engine import PipelineEngine

from models.preference_loss import PreferenceLoss, metrics_from_sums
from train.config.run_config import RunConfig
from train.distributed.setup import say
from train.errors import ConfigError
from train.preference.reference import REFERENCE_FILE, load_reference, reference_pass, reference_steps, save_reference


def preference_loss_of(config: RunConfig) -> PreferenceLoss | None:
    """The last stage's loss for preference data (None for the other formats)."""
    if config.data_format.kind != "preference":
        return None
    return PreferenceLoss(loss_type=config.flags.preference_loss, beta=config.flags.beta)


class PreferenceRun:
    """The reference of a run and its metrics; `None`-like for other formats (`active` False)."""

    def __init__(self, config: RunConfig, engine: PipelineEngine):
        self.config, self.engine = config, engine
        self.loss_fn = engine.module.loss_fn if isinstance(engine.module.loss_fn, PreferenceLoss) else None

    @property
    def active(self) -> bool:
        return self.loss_fn is not None

    def start(self, train, validation, eval_blocks: int, start_step: int) -> None:
        """Reference log-probabilities of every training block and of the evaluated validation blocks (keyed after
        the training blocks): computed by the pipeline before step 1 and saved with the run; a resumed run reads
        them back (never recomputed with trained weights)."""
        if not self.active:
            return
        out, engine = self.config.output_dir, self.engine
        if start_step > 0:  # this folder's, else that of the run --load names (RUN/checkpoints/step_N)
            run_dirs = [out, Path(self.config.flags.load).resolve().parent.parent]
            table = next((t for t in map(load_reference, run_dirs) if t is not None), None)
            if table is None:
                raise ConfigError(
                    f"{REFERENCE_FILE} is in neither {run_dirs[0]} nor {run_dirs[1]}: a resumed preference run reads "
                    "the reference log-probabilities its first step computed; keep it beside the checkpoints"
                )
            self.loss_fn.reference = table
            if engine.is_last_stage() and engine.grid.data_parallel_id == 0 and load_reference(out) is None:
                save_reference(out, table)  # the run's own copy, for the next resume
            return
        start, batch = time.perf_counter(), self.config.batch
        feed = dict(
            micro_batch_size=batch.micro_batch_size,
            num_micro_batches=batch.num_micro_batches,
            dp_rank=engine.grid.data_parallel_id,
            dp_size=engine.grid.data_parallel_size,
            document_attention=self.config.document_attention,
        )
        steps = reference_steps(train, **feed)
        if eval_blocks:
            steps += reference_steps(validation.select(range(eval_blocks)), key_offset=len(train), **feed)
        group = engine.grid.get_data_parallel_group() if engine.grid.data_parallel_size > 1 else None
        table = reference_pass(engine, self.loss_fn, steps, keys=len(train) + eval_blocks, group=group)
        self.loss_fn.reference = table
        if engine.is_last_stage() and engine.grid.data_parallel_id == 0:
            save_reference(out, table)
        dist.barrier()  # the pass ends on the last stages: its time is theirs (benches read it, docs/performance.md)
        seconds = time.perf_counter() - start
        say(
            f"reference log-probabilities of {len(train) + eval_blocks:,} blocks in {seconds:.1f} s (one forward-only "
            f"pass): {out / REFERENCE_FILE}"
        )

    def metrics(self, prefix: str = "") -> dict[str, float]:
        """TRL's six metrics over the pairs since the last call, summed over the last stages (a collective: every
        rank calls it at the same steps)."""
        if not self.active:
            return {}
        sums = self.loss_fn.take_sums() if self.engine.is_last_stage() else torch.zeros(7, dtype=torch.float64)
        if self.engine.grid.get_slice_parallel_rank() != 0:  # tensor-parallel ranks compute the same pairs
            sums.zero_()
        sums = sums.to(get_accelerator().current_device_name())  # NCCL reduces device tensors only
        dist.all_reduce(sums)
        return metrics_from_sums(sums.cpu(), prefix)
