"""Which blocks each rank feeds the pipeline engine, step by step.

Step s of the run uses the global batch `order[s*G:(s+1)*G]` of a per-epoch permutation
seeded by (seed, epoch), or of the blocks in order (`--data-order sequential`, what a stream gives).
Data-parallel replica r takes its contiguous slice of it and cuts it into micro-batches. The first and the
last stage of one replica compute the same indices, so they always agree; replicas are disjoint and together
cover the global batch. The position is a pure function of the step, which makes resuming exact. A stream
(`--streaming`) gives the same batches in order, its position kept in the checkpoint (StreamMicroBatches).

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
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from queue import Queue

import numpy as np
import torch
from datasets import Dataset

from models.loss import IGNORE_INDEX

PREFETCH_STEPS = 2  # global batches a stream reads ahead of the engine


class MicroBatchFeed:
    """What both feeds share: the replica's place in the batch, the step counter, the data wait, the trace."""

    def __init__(
        self,
        *,
        micro_batch_size: int,
        num_micro_batches: int,
        dp_rank: int,
        dp_size: int,
        document_attention: bool,
        start_step: int = 0,
        trace_path: Path | None = None,
    ):
        self.micro_batch_size, self.num_micro_batches = micro_batch_size, num_micro_batches
        self.dp_rank, self.dp_size = dp_rank, dp_size
        self.document_attention = document_attention
        self.per_replica = micro_batch_size * num_micro_batches
        self.global_batch = self.per_replica * dp_size
        self.step = start_step  # the steps fed so far
        # With a trace path, every micro-batch handed to the engine is recorded there (appended on resume).
        self.trace = open(trace_path, "a") if trace_path else None  # closed in close()
        self.wait_seconds = 0.0  # time the engine spent waiting on us since `take_wait_seconds`
        # added to the block numbers that key the preference reference (train/preference/reference.py)
        self.key_offset = 0

    def feed(self, rows: dict, blocks: list[int], scale: torch.Tensor | None, started: float) -> Iterator[tuple]:
        """This replica's rows of one step (`blocks`: their numbers, for the trace) as engine micro-batches."""
        self.wait_seconds += time.perf_counter() - started
        for index in range(self.num_micro_batches):
            part = slice(index * self.micro_batch_size, (index + 1) * self.micro_batch_size)
            keys = torch.tensor(blocks[part]) + self.key_offset  # preference data: the rows' reference table keys
            inputs, labels = engine_inputs(rows, part, scale, self.document_attention, keys)
            if self.trace is not None:
                record = trace_record(self.step + 1, index, blocks=blocks[part], input_ids=inputs[0], labels=labels)
                self.trace.write(json.dumps(record) + "\n")
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


class TrainMicroBatches(MicroBatchFeed):
    """Endless iterator of ((input_ids, position_ids), labels) micro-batches for one data-parallel replica."""

    def __init__(self, *, blocks: Dataset, seed: int, shuffle: bool = True, **feed):
        super().__init__(**feed)
        self.blocks, self.seed, self.shuffle = blocks, seed, shuffle
        self.masked = "labels" in blocks.column_names
        # Answer tokens of every block, to scale each step's loss (one column read once, 4 bytes per block).
        self.loss_tokens = blocks["loss_tokens"] if self.masked else None
        self.steps_per_epoch = len(blocks) // self.global_batch
        if self.steps_per_epoch == 0:
            raise ValueError(f"{len(blocks)} training blocks are fewer than one global batch of {self.global_batch}")
        self._order: tuple[int, torch.Tensor] | None = None

    def epoch_order(self, epoch: int) -> torch.Tensor:
        if self._order is None or self._order[0] != epoch:
            generator = torch.Generator().manual_seed(self.seed * 100_003 + epoch)
            n = len(self.blocks)
            self._order = (epoch, torch.randperm(n, generator=generator) if self.shuffle else torch.arange(n))
        return self._order[1]

    def global_indices(self, step: int) -> torch.Tensor:
        """The blocks of the whole global batch of `step`, replica by replica."""
        epoch, k = divmod(step, self.steps_per_epoch)
        return self.epoch_order(epoch)[k * self.global_batch : (k + 1) * self.global_batch]

    def step_indices(self, step: int) -> list[list[int]]:
        """This replica's micro-batches (lists of block indices) for `step`."""
        mine = self.global_indices(step)[self.dp_rank * self.per_replica : (self.dp_rank + 1) * self.per_replica]
        mine = mine.tolist()
        return [mine[i : i + self.micro_batch_size] for i in range(0, self.per_replica, self.micro_batch_size)]

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
            indices = [i for micro_batch in self.step_indices(self.step) for i in micro_batch]
            # One Arrow gather per step: 16 small takes cost 5x more, on the first stage's critical path.
            yield from self.feed(self.blocks[indices], indices, self.loss_scale(self.step), start)


class StreamMicroBatches(MicroBatchFeed):
    """The same micro-batches from a stream (`--streaming`, train/data/streaming.py: BlockStream): every
    data-reading rank reads each global batch whole, in order, and keeps its replica's slice; an epoch's last,
    partial global batch is dropped, as in `TrainMicroBatches`. `position(step)` is where the stream resumes
    after training step `step`; a checkpoint keeps it."""

    def __init__(self, *, stream, masked: bool, **feed):
        super().__init__(**feed)
        self.stream, self.masked = stream, masked
        self.positions = {self.step: stream.state}  # training step -> the stream's state after it (a few kept)
        self.answer_counts: dict[int, int] = {}

    def position(self, step: int) -> dict | None:
        return self.positions.get(step)

    def answer_tokens(self, step: int) -> int | None:
        return self.answer_counts.get(step) if self.masked else None

    def global_batches(self) -> Iterator[tuple[list[dict], dict]]:
        """(the blocks of a global batch, the stream's state after them), batch after batch."""
        blocks, batch, epochs_without_a_batch = iter(self.stream), [], 0
        for item in blocks:
            if item is None:  # an epoch ends: its partial global batch is dropped
                epochs_without_a_batch += 1
                if epochs_without_a_batch > 1:
                    raise ValueError(f"the stream holds fewer blocks than one global batch of {self.global_batch}")
                batch = []
                continue
            batch.append(item[0])
            if len(batch) == self.global_batch:
                yield batch, item[1]
                batch, epochs_without_a_batch = [], 0

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        batches = prefetched(self.global_batches(), depth=PREFETCH_STEPS)
        while True:
            start = time.perf_counter()
            batch, state = next(batches)
            self.positions = {step: p for step, p in self.positions.items() if step > self.step - 4}
            self.positions[self.step + 1] = state
            first = self.dp_rank * self.per_replica
            mine = batch[first : first + self.per_replica]
            rows = {key: torch.from_numpy(np.stack([block[key] for block in mine])) for key in mine[0]}
            scale = None
            if self.masked:
                tokens = sum(int(block["loss_tokens"]) for block in batch)
                self.answer_counts = {self.step + 1: tokens}
                scale = answer_token_scale(self.num_micro_batches, self.dp_size, tokens)
            offset = self.step * self.global_batch + first  # the blocks' places in the stream, for the trace
            yield from self.feed(rows, list(range(offset, offset + len(mine))), scale, start)


def prefetched(items: Iterator, depth: int) -> Iterator:
    """`items`, produced up to `depth` ahead by a thread of their own: the stream is read and tokenized while the
    engine computes (the tokenizer and Arrow release the GIL). The order is the producer's; its failure is raised
    here, in the consumer."""
    queue: Queue = Queue(maxsize=depth)

    def produce() -> None:
        try:
            for item in items:
                queue.put((item, None))
        except BaseException as e:  # handed to the consumer, which raises it
            queue.put((None, e))

    threading.Thread(target=produce, daemon=True, name="stream-prefetch").start()
    while True:
        item, failure = queue.get()
        if failure is not None:
            raise failure
        yield item


def answer_token_scale(num_micro_batches: int, dp_size: int, answer_tokens: float) -> torch.Tensor:
    """What each micro-batch's summed loss is multiplied by, so that DeepSpeed's mean over the micro-batches and
    the replicas of a step is the mean over the step's answer tokens (models/loss.py)."""
    return torch.tensor(num_micro_batches * dp_size / answer_tokens)


def engine_inputs(
    rows: dict, part: slice, scale: torch.Tensor | None, document_attention: bool, keys: torch.Tensor | None = None
) -> tuple:
    """((input_ids, position_ids), labels) of one micro-batch as the engine takes it: labels are the inputs for
    text (less each document's first token under document attention), (labels, loss scale) for masked data
    (DeepSpeed hands a tuple of tensors to the loss function as it is), and for preference pairs (labels, scale,
    answer slots, `keys`: the rows' reference keys; models/preference_loss.py)."""
    input_ids = rows["input_ids"][part].long()
    if document_attention:
        position_ids = rows["position_ids"][part].long()
    else:
        position_ids = torch.arange(input_ids.shape[1]).expand_as(input_ids).contiguous()
    if "answer_slots" in rows:
        labels = (rows["labels"][part].long(), scale, rows["answer_slots"][part].long(), keys)
    elif scale is not None:
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
    key_offset: int = 0,
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
        keys = torch.arange(start, start + per_step) + key_offset  # preference data: the reference's keys
        micro_batches = [
            engine_inputs(
                rows, slice(i, i + micro_batch_size), scale, document_attention, keys[i : i + micro_batch_size]
            )
            for i in range(0, per_step, micro_batch_size)
        ]
        steps.append((micro_batches, weight))
    return steps
