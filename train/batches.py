"""Which blocks each rank feeds the pipeline engine, step by step.

Step s of the run uses the global batch `order[s*G:(s+1)*G]` of a per-epoch permutation
seeded by (seed, epoch). Data-parallel replica r takes its contiguous slice of it and
cuts it into micro-batches. The first and the last stage of one replica compute the
same indices, so they always agree; replicas are disjoint and together cover the global
batch. The position is a pure function of the step, which makes resuming exact.
"""

import json
import time
from collections.abc import Iterator
from pathlib import Path

import torch
from datasets import Dataset


class TrainMicroBatches:
    """Endless iterator of (input_ids, labels) micro-batches for one data-parallel replica."""

    def __init__(
        self,
        blocks: Dataset,
        micro_batch_size: int,
        num_micro_batches: int,
        dp_rank: int,
        dp_size: int,
        seed: int,
        start_step: int = 0,
        trace_path: Path | None = None,
    ):
        self.blocks = blocks
        self.micro_batch_size = micro_batch_size
        self.num_micro_batches = num_micro_batches
        self.dp_rank = dp_rank
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

    def step_indices(self, step: int) -> list[list[int]]:
        """This replica's micro-batches (lists of block indices) for `step`."""
        epoch, k = divmod(step, self.steps_per_epoch)
        per_replica = self.micro_batch_size * self.num_micro_batches
        start = k * self.global_batch + self.dp_rank * per_replica
        mine = self.epoch_order(epoch)[start : start + per_replica].tolist()
        return [mine[i : i + self.micro_batch_size] for i in range(0, per_replica, self.micro_batch_size)]

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        while True:
            start = time.perf_counter()
            micro_batches = self.step_indices(self.step)
            # One Arrow gather per step: 16 small takes cost 5x more, on the first stage's critical path.
            step_ids = self.blocks[[i for indices in micro_batches for i in indices]]["input_ids"].long()
            self.wait_seconds += time.perf_counter() - start
            for index, indices in enumerate(micro_batches):
                if self.trace is not None:
                    self.trace.write(json.dumps({"step": self.step + 1, "micro": index, "blocks": indices}) + "\n")
                    self.trace.flush()
                input_ids = step_ids[index * self.micro_batch_size : (index + 1) * self.micro_batch_size]
                yield input_ids, input_ids
            self.step += 1

    def take_wait_seconds(self) -> float:
        """Seconds the engine waited on this iterator since the last call."""
        waited, self.wait_seconds = self.wait_seconds, 0.0
        return waited

    def close(self) -> None:
        if self.trace is not None:
            self.trace.close()


def eval_micro_batches(blocks: Dataset, micro_batch_size: int, dp_rank: int, dp_size: int, max_blocks: int) -> list:
    """The validation blocks in order, this replica's share, as (input_ids, labels) micro-batches."""
    per_replica = max_blocks // dp_size
    start = dp_rank * per_replica
    out = []
    for i in range(start, start + per_replica, micro_batch_size):
        input_ids = blocks[list(range(i, i + micro_batch_size))]["input_ids"].long()
        out.append((input_ids, input_ids))
    return out
