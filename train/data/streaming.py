"""`--streaming`: sources read as a `datasets` stream and packed on the fly, with the cached path's blocks.

Each source is read with `load_dataset(..., streaming=True)` in batches of `STREAM_BATCH` records, tokenized and cut
exactly as train/data/packing.py and train/data/example_packing.py cut the cached blocks (text: one token stream carried
across batches; instruction and chat data: groups of `PACK_BATCH` kept examples packed together), so a cached run
reading its blocks in order (`--data-order sequential`) sees the same blocks. Sources follow one another (or, with
weights, each block is drawn from a source with the weights' odds); an epoch ends where the sources do.

Every data-reading rank reads the whole stream and keeps its replica's slice of each global batch
(train/data/batches.py: StreamMicroBatches), so the blocks do not depend on the layout. Each block comes with the
point to resume after it: the stream's `state_dict()` before the batch of records it came from, what was carried
into that batch, and how many of the batch's blocks were already used. A checkpoint keeps that point; a resumed
run reads the batch again and sees the blocks an uninterrupted run would.
"""

import copy
import itertools
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
from datasets import Dataset, IterableDataset, load_dataset
from transformers import PreTrainedTokenizerBase

from models.hub import not_found
from train.data.example_packing import PACK_BATCH, pack_examples
from train.data.examples import KEPT, TRUNCATED, DataFormat, chat_template_of, encode_examples
from train.data.packing import TokenPacker, document_ids
from train.data.sources import Source, check_text_values, unreadable
from train.errors import ConfigError

# Records read, tokenized and packed at a time: the blocks do not depend on it (text carries its unfinished block
# across batches; examples are packed in groups of PACK_BATCH kept ones), but the work arrives in steps of it. 1,000
# web documents are ~1M tokens, 4 s of a tokenizer on one core here: 128 keep a step's wait short and even.
STREAM_BATCH = 128

Block = dict[str, np.ndarray]
Resume = dict  # where a source's stream continues after a block (see the module docstring)


def stream_parts(source: Source) -> list[tuple[str | None, IterableDataset]]:
    """One source as `datasets` streams, one per builder of its files (nothing is read yet, nothing is cached on
    disk), in the order the cached path concatenates them."""
    try:
        if source.hub_name:
            return [(None, load_dataset(source.hub_name, source.hub_config, split=source.hub_split, streaming=True))]
        return [
            (builder, load_dataset(builder, data_files=files, split="train", streaming=True))
            for builder, files in source.files.items()
        ]
    except Exception as e:  # the hub: offline, unknown name, config or split (many exception types)
        if not source.hub_name:
            raise ConfigError(unreadable(source.spec, None, e)) from None
        raise ConfigError(not_found("--data", source.hub_name, e)) from None


def record_batches(
    source: Source, data_format: DataFormat, resume: Resume | None = None
) -> Iterator[tuple[Resume, dict[str, list]]]:
    """(the point before the batch, a batch of STREAM_BATCH records as {our column name: values}) until the source
    ends, from the start or from `resume`."""
    first_part = resume["part"] if resume else 0
    for part, (builder, records) in enumerate(stream_parts(source)):
        if part < first_part:
            continue
        loaded = None
        if resume is not None and part == first_part:
            loaded = resume["dataset"]
            records.load_state_dict(loaded)
        columns = data_format.columns()
        if builder == "text" and not data_format.masked:
            columns = {"text": ("text", "")}  # a plain .txt file has one column, whatever the flag says
        stream, read = iter(records), 0
        while True:
            # Until the first record comes, datasets 5.2 reports a fresh state even after load_state_dict: the
            # first batch of a resumed stream starts where the loaded state says.
            state = loaded if loaded is not None else copy.deepcopy(records.state_dict())
            before, loaded = {"part": part, "dataset": state}, None
            try:
                batch = list(itertools.islice(stream, STREAM_BATCH))
            except Exception as e:  # a malformed or unreadable file met mid-stream
                raise ConfigError(unreadable(source.spec, builder, e)) from None
            if not batch:
                break
            yield before, read_columns(source, batch, columns, read)
            read += len(batch)


def read_columns(source: Source, batch: list[dict], columns: dict, read: int) -> dict[str, list]:
    """A batch of records as {our column name: values} (`read` records before it), type-checked as cached."""
    out = {}
    for name, (ours, flag) in columns.items():
        if name not in batch[0]:
            raise ConfigError(f"{source.spec} has no column {name!r} (columns: {list(batch[0])}); pass {flag}")
        out[ours] = [record.get(name) for record in batch]
        check_text_values(source.spec, out[ours], name, (ours, flag), first=read + 1)
    return out


class SourceBlocks:
    """The blocks of one source in order, each with the point to resume after it."""

    def __init__(self, source: Source, data_format: DataFormat, tokenizer: PreTrainedTokenizerBase, seq_len: int):
        self.source, self.data_format, self.tokenizer, self.seq_len = source, data_format, tokenizer, seq_len
        self.template = chat_template_of(data_format, tokenizer) if data_format.kind == "chat" else None
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id

    def blocks(self, resume: Resume | None = None) -> Iterator[tuple[Block, Resume]]:
        return self.example_blocks(resume) if self.data_format.masked else self.text_blocks(resume)

    def text_blocks(self, resume: Resume | None) -> Iterator[tuple[Block, Resume]]:
        packer = TokenPacker(self.seq_len, resume["carry"] if resume else None)
        skip = resume["skip"] if resume else 0
        for before, batch in record_batches(self.source, self.data_format, resume):
            carried = packer.state()
            made = packer.pack_documents(document_ids(batch["text"], self.tokenizer))
            for k in range(skip, len(made["input_ids"])):
                yield {key: rows[k] for key, rows in made.items()}, {**before, "carry": carried, "skip": k + 1}
            skip = 0

    def example_blocks(self, resume: Resume | None) -> Iterator[tuple[Block, Resume]]:
        """Kept examples in groups of PACK_BATCH, each group packed as the cached path packs it. A group may start
        inside a batch of records: its resume point names the batch and how many kept examples of it to pass."""
        drop, skip = (resume["drop"], resume["skip"]) if resume else (0, 0)
        pending: list[tuple[list, list]] = []
        origin: Resume = {}
        for before, batch in record_batches(self.source, self.data_format, resume):
            kept = self.kept_examples(batch)[drop:]
            for index, example in enumerate(kept):
                if not pending:
                    origin = {**before, "drop": drop + index}
                pending.append(example)
                if len(pending) == PACK_BATCH:
                    yield from self.packed(pending, origin, skip)
                    pending, skip = [], 0
            drop = 0
        if pending:
            yield from self.packed(pending, origin, skip)

    def kept_examples(self, batch: dict[str, list]) -> list[tuple[list, list]]:
        encoded = encode_examples(
            batch, self.tokenizer, data_format=self.data_format, seq_len=self.seq_len, template=self.template
        )
        if problem := next((p for p in encoded["problem"] if p), None):
            raise ConfigError(f"{self.source.spec}: a malformed example: {problem}")  # as cached: never left out
        return [
            (ids, labels)
            for ids, labels, status in zip(encoded["input_ids"], encoded["labels"], encoded["status"], strict=True)
            if status in (KEPT, TRUNCATED)
        ]

    def packed(self, examples: list, origin: Resume, skip: int) -> Iterator[tuple[Block, Resume]]:
        made = pack_examples(
            {"input_ids": [ids for ids, _ in examples], "labels": [labels for _, labels in examples]},
            self.seq_len,
            self.data_format.packing == "pad",
            self.pad_id,
        )
        for k in range(skip, len(made["input_ids"])):
            yield {key: np.asarray(rows[k], dtype=np.int32) for key, rows in made.items()}, {**origin, "skip": k + 1}


class BlockStream:
    """The run's training blocks, source after source (or drawn with the weights' odds), epoch after epoch.

    Iterating yields (block, state to resume after it), and None where an epoch ends (the sources are spent;
    with weights, epochs never end: a spent source starts again). `held_out[i]` blocks at the start of source i
    are validation and never trained on."""

    def __init__(
        self,
        sources: list[SourceBlocks],
        *,
        weights: list[float] | None,
        seed: int,
        held_out: list[int],
        state: dict | None = None,
    ):
        self.sources, self.held_out, self.seed = sources, held_out, seed
        self.weights = None if weights is None else np.asarray(weights) / sum(weights)
        self.state = state or {"epoch": 0, "positions": [None] * len(sources), "current": 0, "rng": None}

    def source_blocks(self, index: int, position: Resume | None) -> Iterator[tuple[Block, Resume]]:
        blocks = self.sources[index].blocks(position)
        return itertools.islice(blocks, self.held_out[index], None) if position is None else blocks

    def __iter__(self) -> Iterator[tuple[Block, dict] | None]:
        return self.mixed() if self.weights is not None else self.chained()

    def chained(self) -> Iterator[tuple[Block, dict] | None]:
        epoch, current, position = self.state["epoch"], self.state["current"], self.state["positions"][0]
        while True:
            for index in range(current, len(self.sources)):
                for block, after in self.source_blocks(index, position):
                    yield block, {"epoch": epoch, "current": index, "positions": [after], "rng": None}
                position = None
            epoch, current = epoch + 1, 0
            yield None

    def mixed(self) -> Iterator[tuple[Block, dict] | None]:
        rng = np.random.default_rng([self.seed, 7919])
        if self.state["rng"] is not None:
            rng.bit_generator.state = self.state["rng"]
        positions = list(self.state["positions"])
        streams = [self.source_blocks(i, p) for i, p in enumerate(positions)]
        while True:
            index = int(rng.choice(len(streams), p=self.weights))
            item = next(streams[index], None)
            if item is None:  # a spent source starts again
                streams[index] = self.source_blocks(index, None)
                item = next(streams[index], None)
                if item is None:
                    raise ConfigError(
                        f"{self.sources[index].source.spec} holds no training block beyond the {self.held_out[index]} "
                        "held out for validation: use more data, --val-data, or fewer --eval-blocks"
                    )
            positions[index] = item[1]
            yield item[0], {"epoch": 0, "current": 0, "positions": list(positions), "rng": rng.bit_generator.state}


def first_blocks(sources: list[SourceBlocks], count: int) -> list[Block]:
    """Up to `count` blocks from the start of the sources, in order (validation)."""
    chained = itertools.chain.from_iterable(s.blocks() for s in sources)
    return [block for block, _ in itertools.islice(chained, count)]


def blocks_dataset(blocks: list[Block]) -> Dataset:
    """Blocks held in memory as a `datasets.Dataset` in torch format, like the cached splits."""
    columns = {key: np.stack([block[key] for block in blocks]) for key in blocks[0]}
    return Dataset.from_dict(columns).with_format("torch")


@dataclass(frozen=True, kw_only=True)
class StreamingData:
    """A streaming run's data: the validation blocks (in memory) and how to open the training stream."""

    validation: Dataset
    sources: list[SourceBlocks]
    weights: list[float] | None
    held_out: list[int]
    seed: int
    # Where every source's training blocks start in the first epoch: after its held-out blocks, read once already.
    starts: list[Resume | None]

    def stream(self, state: dict | None = None) -> BlockStream:
        first = {"epoch": 0, "current": 0, "positions": self.starts if self.weights else self.starts[:1], "rng": None}
        return BlockStream(
            self.sources, weights=self.weights, seed=self.seed, held_out=self.held_out, state=state or first
        )


def streaming_data(
    sources: list[Source],
    val_sources: list[Source] | None,
    data_format: DataFormat,
    tokenizer: PreTrainedTokenizerBase,
    *,
    seq_len: int,
    eval_blocks: int,
    global_batch: int,
    seed: int,
) -> StreamingData:
    """Validation is the first `eval_blocks` blocks of `val_sources`, or else the first `eval_blocks` blocks of the
    training stream, shared out over the sources and never trained on. Reads the stream's first global batch to
    fail here, not in the first step, when the data cannot fill one."""
    train = [SourceBlocks(s, data_format, tokenizer, seq_len) for s in sources]
    starts: list[Resume | None] = [None] * len(train)
    if val_sources:
        held_out = [0] * len(train)
        validation = first_blocks([SourceBlocks(s, data_format, tokenizer, seq_len) for s in val_sources], eval_blocks)
    else:
        held_out, validation = [-(-eval_blocks // len(train))] * len(train), []
        for index, (source, count) in enumerate(zip(train, held_out, strict=True)):
            held = list(itertools.islice(source.blocks(), count))
            validation += [block for block, _ in held]
            starts[index] = held[-1][1] if held else None
        validation = validation[:eval_blocks]
    if len(validation) < global_batch:
        raise ConfigError(
            f"{len(validation)} validation blocks of {seq_len} tokens do not fill one global batch of {global_batch} "
            "sequences: use more --val-data, more data, or a smaller train_batch_size"
        )
    weights = [s.weight for s in sources] if sources[0].weight is not None else None
    data = StreamingData(
        validation=blocks_dataset(validation),
        sources=train,
        weights=weights,
        held_out=held_out,
        seed=seed,
        starts=starts,
    )
    first = list(itertools.islice(iter(data.stream()), global_batch))
    if len(first) < global_batch or None in first:
        raise ConfigError(
            f"the training stream holds fewer than {global_batch} blocks of {seq_len} tokens (one global batch) "
            f"beyond the {sum(held_out)} held out for validation: use more data, --val-data, fewer --eval-blocks, "
            "or a smaller train_batch_size"
        )
    return data
