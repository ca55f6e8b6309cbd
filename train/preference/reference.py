"""The reference log-probabilities of preference training, computed once before step 1 (trl 1.16's
`precompute_ref_log_probs=True`) by the pipeline itself, with the weights training starts from.

Why before training, not a reference forward per micro-batch: the reference is the model as training starts
(full fine-tuning: the loaded weights; LoRA: the base with the starting adapters), so one forward-only pass over
the data gives every number the loss will ever read; a per-micro-batch reference forward would cost that pass
again at every epoch and, for full fine-tuning, a second copy of the weights on every stage. The cost is one
evaluation pass over the training and validation blocks (about a third of a training epoch's compute) and 8 bytes
per answer on the last stage. The table is saved with the run (`reference.pt`), so a resumed run reads it and
never recomputes it with trained weights.

Keys: a training block's key is its index in the training blocks; a validation block's, the number of training
blocks plus its index. Each replica's last stage records the blocks it was fed; a sum over the data-parallel group
of the last stage (each block recorded by exactly one replica) gives every last stage the whole table.
"""

import math
from collections.abc import Iterable
from pathlib import Path

import torch
import torch.distributed as dist
from datasets import Dataset, concatenate_datasets
from deepspeed.accelerator import get_accelerator

from models.preference_loss import PreferenceLoss
from train.data.batches import eval_steps

REFERENCE_FILE = "reference.pt"


def reference_pass(engine, loss_fn: PreferenceLoss, steps: Iterable[list], keys: int, group=None) -> torch.Tensor:
    """Run every evaluation step (a list of engine micro-batches, `engine_inputs`' form) forward only through the
    pipeline and return the table [keys, answer slots] float64 of the answers' log-probabilities (on every last
    stage; elsewhere an empty table). `group`: the last stages' data-parallel group (None: no other replica)."""
    loss_fn.reference, loss_fn.recorded = None, {}
    for micro_batches in steps:
        engine.eval_batch(iter(micro_batches), num_micro_batches=len(micro_batches), bcast_loss=False)
    if not engine.is_last_stage():
        return torch.zeros(0, 0, dtype=torch.float64)
    device = get_accelerator().current_device_name()  # NCCL reduces device tensors only
    width = max([len(row) for row in loss_fn.recorded.values()] + [0])
    if group is not None:
        width_tensor = torch.tensor([width], device=device)
        dist.all_reduce(width_tensor, op=dist.ReduceOp.MAX, group=group)
        width = int(width_tensor)
    table = torch.zeros(keys, width, dtype=torch.float64)
    for key, row in loss_fn.recorded.items():
        table[key, : len(row)] = row
    if group is not None:
        table = table.to(device)
        dist.all_reduce(table, group=group)
        table = table.cpu()
    loss_fn.recorded = {}
    return table


def reference_steps(blocks: Dataset, *, key_offset: int = 0, **feed) -> list[list]:
    """Every block of `blocks` in evaluation steps of this replica's micro-batches (`eval_steps`' `feed` settings:
    micro_batch_size, num_micro_batches, dp_rank, dp_size, document_attention). The last step is filled up with
    blocks from the start under the key -1, which the loss does not record: a block recorded by two replicas would
    count twice in the sum over replicas."""
    n, per_step = len(blocks), feed["micro_batch_size"] * feed["num_micro_batches"] * feed["dp_size"]
    total = math.ceil(n / per_step) * per_step
    padded = blocks if total == n else concatenate_datasets([blocks, blocks.select([i % n for i in range(n, total)])])
    steps = eval_steps(padded, max_blocks=total, key_offset=key_offset, **feed)

    def wrapped(labels: tuple) -> tuple:
        keys = labels[3]
        return (*labels[:3], torch.where(keys - key_offset < n, keys, torch.full_like(keys, -1)))

    return [[(inputs, wrapped(labels)) for inputs, labels in micro_batches] for micro_batches, _ in steps]


def save_reference(run_dir: Path, table: torch.Tensor) -> Path:
    path = run_dir / REFERENCE_FILE
    tmp = path.with_suffix(".tmp")
    torch.save(table, tmp)
    tmp.replace(path)
    return path


def load_reference(run_dir: Path) -> torch.Tensor | None:
    """The table a run saved before its first step, or None where it has none yet."""
    path = run_dir / REFERENCE_FILE
    return torch.load(path, weights_only=True) if path.is_file() else None
