"""Which blocks each rank feeds the pipeline engine, step by step.

Step s of the run uses the global batch `order[s*G:(s+1)*G]` of a per-epoch permutation
seeded by (seed, epoch). Data-parallel replica r takes its contiguous slice of it and
cuts it into micro-batches. The first and the last stage of one replica compute the
same indices, so they always agree; replicas are disjoint and together cover the global
batch. The position is a pure function of the step, which makes resuming exact.

Blocks of instruction or chat data carry their own labels and answer-token counts: each micro-batch's
labels then travel with the scale that turns the loss into the mean over the global batch's answer tokens
(models/loss.py).

The first stage gets (input_ids, position_ids): under document attention the positions stored with each block
(each document counted from 0), else 0..S-1 for every row (causal across the block). Under document attention
no document's first token is a target of the token before it (the end of another document): for text its label
is -100 here; instruction and chat examples never label their first token.
"""

import hashlib
import json
import time
from collections.abc import Iterator
from pathlib import Path

import torch
from datasets import Dataset

from models.loss import IGNORE_INDEX


class TrainMicroBatches:
    """Endless iterator of ((input_ids, position_ids), labels) micro-batches for one data-parallel replica."""

    def __init__(
        self,
        *,
        blocks: Dataset,
        micro_batch_size: int,
        num_micro_batches: int,
        dp_rank: int,
        dp_size: int,
        seed: int,
        document_attention: bool,
        start_step: int = 0,
        trace_path: Path | None = None,
    ):
        self.blocks = blocks
        self.document_attention = document_attention
        self.micro_batch_size = micro_batch_size
        self.num_micro_batches = num_micro_batches
        self.dp_rank, self.dp_size = dp_rank, dp_size
        self.masked = "labels" in blocks.column_names
        # Answer tokens of every block, to scale each step's loss (one column read once, 4 bytes per block).
        self.loss_tokens = blocks["loss_tokens"] if self.masked else None
        self.global_batch = micro_batch_size * num_micro_batches * dp_size
        self.steps_per_epoch = len(blocks) // self.global_batch
        if self.steps_per_epoch == 0:
            raise ValueError(f"{len(blocks)} training blocks are fewer than one global batch of {self.global_batch}")
        self.seed = seed
        self.step = start_step
        # With a trace path, every micro-batch handed to the engine is recorded there (appended on resume).
        self.trace = open(trace_path, "a") if trace_path else None  # noqa: SIM115 (closed in close())
        self.wait_seconds = 0.0  # time the engine spent waiting on us since `take_wait_seconds`
        self._order: tuple[int, torch.Tensor] | None = None

    def epoch_order(self, epoch: int) -> torch.Tensor:
        if self._order is None or self._order[0] != epoch:
            generator = torch.Generator().manual_seed(self.seed * 100_003 + epoch)
            self._order = (epoch, torch.randperm(len(self.blocks), generator=generator))
        return self._order[1]

    def global_indices(self, step: int) -> torch.Tensor:
        """The blocks of the whole global batch of `step`, replica by replica."""
        epoch, k = divmod(step, self.steps_per_epoch)
        return self.epoch_order(epoch)[k * self.global_batch : (k + 1) * self.global_batch]

    def step_indices(self, step: int) -> list[list[int]]:
        """This replica's micro-batches (lists of block indices) for `step`."""
        per_replica = self.micro_batch_size * self.num_micro_batches
        mine = self.global_indices(step)[self.dp_rank * per_replica : (self.dp_rank + 1) * per_replica].tolist()
        return [mine[i : i + self.micro_batch_size] for i in range(0, per_replica, self.micro_batch_size)]

    def answer_tokens(self, step: int) -> int | None:
        """The answer tokens of the global batch of training step `step` (counted from 1, as the loop counts; all
        replicas), for instruction and chat data; None for text."""
        return int(self.loss_tokens[self.global_indices(step - 1)].sum()) if self.masked else None

    def loss_scale(self, index: int) -> torch.Tensor | None:
        """micro-batches x replicas / answer tokens of global batch `index` (masked data), else None."""
        if not self.masked:
            return None
        return answer_token_scale(self.num_micro_batches, self.dp_size, self.answer_tokens(index + 1))

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        while True:
            start = time.perf_counter()
            micro_batches = self.step_indices(self.step)
            # One Arrow gather per step: 16 small takes cost 5x more, on the first stage's critical path.
            rows = self.blocks[[i for indices in micro_batches for i in indices]]
            scale = self.loss_scale(self.step)
            self.wait_seconds += time.perf_counter() - start
            for index, indices in enumerate(micro_batches):
                part = slice(index * self.micro_batch_size, (index + 1) * self.micro_batch_size)
                inputs, labels = engine_inputs(rows, part, scale, self.document_attention)
                input_ids = inputs[0]
                if self.trace is not None:
                    self.trace.write(json.dumps(trace_record(self.step + 1, index, indices, input_ids, labels)) + "\n")
                    self.trace.flush()
                yield inputs, labels
            self.step += 1

    def take_wait_seconds(self) -> float:
        """Seconds the engine waited on this iterator since the last call."""
        waited, self.wait_seconds = self.wait_seconds, 0.0
        return waited

    def close(self) -> None:
        if self.trace is not None:
            self.trace.close()


def answer_token_scale(num_micro_batches: int, dp_size: int, answer_tokens: float) -> torch.Tensor:
    """What each micro-batch's summed loss is multiplied by, so that DeepSpeed's mean over the micro-batches and
    the replicas of a step is the mean over the step's answer tokens (models/loss.py)."""
    return torch.tensor(num_micro_batches * dp_size / answer_tokens)


def engine_inputs(rows: dict, part: slice, scale: torch.Tensor | None, document_attention: bool) -> tuple:
    """((input_ids, position_ids), labels) of one micro-batch as the engine takes it: labels are the inputs for
    text (less each document's first token under document attention), and (labels, loss scale) for masked data
    (DeepSpeed hands a tuple of tensors to the loss function as it is)."""
    input_ids = rows["input_ids"][part].long()
    if document_attention:
        position_ids = rows["position_ids"][part].long()
    else:
        position_ids = torch.arange(input_ids.shape[1]).expand_as(input_ids).contiguous()
    if scale is not None:
        labels = (rows["labels"][part].long(), scale)
    elif document_attention:
        labels = input_ids.masked_fill(position_ids == 0, IGNORE_INDEX)
    else:
        labels = input_ids
    return (input_ids, position_ids), labels


def trace_record(step: int, index: int, blocks: list[int], input_ids: torch.Tensor, labels) -> dict:
    """What one micro-batch handed to the engine was: its blocks, shape and a digest of its labels."""
    label_ids = labels[0] if isinstance(labels, tuple) else labels
    digest = hashlib.sha1(label_ids.numpy().tobytes()).hexdigest()[:16]
    return {"step": step, "micro": index, "blocks": blocks, "shape": list(input_ids.shape), "labels": digest}


def eval_steps(
    blocks: Dataset,
    *,
    micro_batch_size: int,
    num_micro_batches: int,
    dp_rank: int,
    dp_size: int,
    max_blocks: int,
    document_attention: bool,
) -> list[tuple[list, float]]:
    """The first `max_blocks` validation blocks in order, as evaluation steps of this replica's micro-batches
    (as `engine_inputs` makes them), each with its weight in the mean: 1 for text, its answer tokens for masked
    data."""
    per_replica, per_step = max_blocks // dp_size, micro_batch_size * num_micro_batches
    masked = "labels" in blocks.column_names
    steps = []
    for first in range(0, per_replica, per_step):
        weight, scale = 1.0, None
        if masked:  # the answer tokens of this evaluation step on every replica
            step_blocks = [r * per_replica + first + j for r in range(dp_size) for j in range(per_step)]
            weight = float(blocks[step_blocks]["loss_tokens"].sum())
            scale = answer_token_scale(num_micro_batches, dp_size, weight)
        start = dp_rank * per_replica + first
        rows = blocks[list(range(start, start + per_step))]
        micro_batches = [
            engine_inputs(rows, slice(i, i + micro_batch_size), scale, document_attention)
            for i in range(0, per_step, micro_batch_size)
        ]
        steps.append((micro_batches, weight))
    return steps
