"""Encoded instruction and chat examples (train/data/examples.py) -> fixed-shape blocks, and their counts.

Every block holds `seq_len` tokens, the shape DeepSpeed's pipeline buffers are built for: examples are packed
nearly in order, each into the first of the last few blocks with room for it (`--packing pack`), or one per
block (`--packing pad`); the rest of a block is padding, right-sided and labelled -100, so causal attention
keeps it invisible. Each token's position in its example is stored beside it (the padding counts as one more
example), so that under `--attention document` (the default for these formats) a packed example sees only
itself, at the positions it would have alone. The examples cut or dropped (`--overlong`) and those skipped for
having no answer token are counted and printed.
"""

from pathlib import Path

import numpy as np
import pyarrow.compute as pc
from datasets import Dataset, Features, Sequence, Value
from transformers import PreTrainedTokenizerBase

from models.loss import IGNORE_INDEX
from train.data.examples import KEPT, MALFORMED, TRUNCATED, DataFormat, encode_records
from train.data.preference import describe_pairs, pack_pair_records
from train.data.sources import Source, load_columns
from train.errors import ConfigError

PACK_BATCH = 10_000
OPEN_BLOCKS = 8  # blocks an example may still join (packing)


def pack_examples(batch: dict, seq_len: int, one_per_block: bool, pad_id: int) -> dict:
    """A `datasets.map` batch of kept examples -> blocks of exactly `seq_len` tokens.

    Each example goes into the first of the last `OPEN_BLOCKS` blocks that has room for it, else into a new
    block (the oldest open one is then closed): near to in-order packing, which keeps the validation blocks
    at the end of a source unbiased, while short examples fill the gaps that long ones leave."""
    blocks: dict[str, list] = {"input_ids": [], "labels": [], "position_ids": [], "loss_tokens": [], "examples": []}
    open_blocks: list[tuple[list[int], list[int], list[int]]] = []  # (ids, labels, the lengths of its examples)

    def close_block(ids: list[int], labels: list[int], lengths: list[int]) -> None:
        padding = seq_len - len(ids)
        blocks["input_ids"].append(ids + [pad_id] * padding)
        blocks["labels"].append(labels + [IGNORE_INDEX] * padding)
        blocks["position_ids"].append([p for length in (*lengths, padding) for p in range(length)])
        # The loss predicts labels[t + 1] from position t: a label at position 0 is never counted.
        blocks["loss_tokens"].append(sum(label != IGNORE_INDEX for label in labels[1:]))
        blocks["examples"].append(len(lengths))

    for example_ids, example_labels in zip(batch["input_ids"], batch["labels"], strict=True):
        fits = [b for b in open_blocks if not one_per_block and len(b[0]) + len(example_ids) <= seq_len]
        if not fits:
            if len(open_blocks) >= (1 if one_per_block else OPEN_BLOCKS):
                close_block(*open_blocks.pop(0))
            open_blocks.append(([], [], []))
            fits = open_blocks[-1:]
        ids, labels, lengths = fits[0]
        ids += example_ids
        labels += example_labels
        lengths.append(len(example_ids))
    for block in open_blocks:
        close_block(*block)
    return blocks


def example_blocks(
    source: Source,
    data_format: DataFormat,
    tokenizer: PreTrainedTokenizerBase,
    seq_len: int,
    num_proc: int | None,
    work_dir: Path | None = None,
) -> tuple[Dataset, dict]:
    """All blocks of one instruction or chat source, and their counts (examples kept, cut, skipped; tokens)."""
    records = load_columns(source, data_format.columns(), work_dir)
    encoded = encode_records(records, data_format, tokenizer, seq_len=seq_len, num_proc=num_proc)
    return pack_encoded(source, encoded, data_format, tokenizer, seq_len=seq_len)


def pack_encoded(
    source: Source, encoded: Dataset, data_format: DataFormat, tokenizer: PreTrainedTokenizerBase, *, seq_len: int
) -> tuple[Dataset, dict]:
    """Encoded records (`encode_records`, in order) -> blocks and their counts; malformed records stop here."""
    status = np.asarray(encoded["status"])
    if (status == MALFORMED).any():
        first = int(np.flatnonzero(status == MALFORMED)[0])
        raise ConfigError(
            f"{source.spec}: {(status == MALFORMED).sum()} malformed examples; the first, record {first + 1}: "
            f"{encoded[first]['problem']}"
        )
    kept = encoded.select(np.flatnonzero((status == KEPT) | (status == TRUNCATED))).remove_columns(
        ["status", "problem"]
    )
    counts = {
        name: int((status == code).sum()) for code, name in enumerate(("kept", "truncated", "dropped", "skipped"))
    }
    counts["kept"] += counts["truncated"]
    if len(kept) == 0:
        raise ConfigError(
            f"{source.spec}: no example has an answer token within --seq-len {seq_len}: nothing to train on"
        )
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    if data_format.kind == "preference":
        blocks, stats = pack_pair_records(kept, data_format, pad_id, seq_len)
        return blocks, {**counts, **stats}
    blocks = kept.map(
        pack_examples,
        fn_kwargs=dict(seq_len=seq_len, one_per_block=data_format.packing == "pad", pad_id=pad_id),
        batched=True,
        batch_size=PACK_BATCH,
        remove_columns=kept.column_names,
        features=block_features(seq_len),
        desc=f"{'packing' if data_format.packing == 'pack' else 'padding'} examples into {seq_len}-token blocks",
    )
    return blocks, {**counts, **block_stats(blocks, kept, seq_len)}


def block_features(seq_len: int) -> Features:
    return Features(
        {
            "input_ids": Sequence(Value("int32"), length=seq_len),
            "labels": Sequence(Value("int32"), length=seq_len),
            "position_ids": Sequence(Value("int32"), length=seq_len),  # in its example (padding: one more)
            "loss_tokens": Value("int32"),  # the positions the loss counts (labels[1:] that are not -100)
            "examples": Value("int32"),
        }
    )


def block_stats(blocks: Dataset, kept: Dataset, seq_len: int) -> dict:
    """Answer tokens (those the loss counts) and example tokens, as fractions of all block tokens."""
    block_tokens = len(blocks) * seq_len
    answer_tokens = int(np.sum(blocks["loss_tokens"]))
    example_tokens = pc.sum(pc.list_value_length(kept.with_format("arrow")["input_ids"])).as_py()
    return {
        "blocks": len(blocks),
        "tokens": block_tokens,
        "answer_tokens": answer_tokens,
        "answer_fraction": answer_tokens / block_tokens,
        "fill_fraction": example_tokens / block_tokens,
    }


def describe(spec: str, stats: dict, data_format: DataFormat, seq_len: int) -> str:
    if data_format.kind == "preference":
        return describe_pairs(spec, stats, data_format, seq_len)
    how = "packed" if data_format.packing == "pack" else "padded"
    return (
        f"{spec}: {stats['kept']:,} examples in {stats['blocks']:,} blocks of {seq_len} tokens ({how})"
        f": {stats['answer_fraction']:.1%} answer tokens, {stats['fill_fraction']:.1%} filled; "
        f"{stats['truncated']} truncated and {stats['dropped']} dropped (longer than --seq-len, --overlong), "
        f"{stats['skipped']} skipped (no answer token)"
    )
