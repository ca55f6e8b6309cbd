"""The packed sources as training and validation splits, and the validation blocks an evaluation uses.

Validation is `--val-data` if given, else the last `--val-fraction` of every training source's blocks (never
shuffled into training); with weights, each source is resampled to its share of the training split.
"""

from pathlib import Path

import numpy as np
from datasets import Dataset, DatasetDict, concatenate_datasets
from transformers import PreTrainedTokenizerBase

from train.data.examples import DataFormat
from train.data.packing import packed_source
from train.data.sources import Source
from train.errors import ConfigError

# Tokens per evaluation by default: a fixed cost whatever the corpus (2% of a 1 GB corpus was 4.9M tokens).
EVAL_TOKENS = 2**20


def mix(parts: list[Dataset], weights: list[float] | None, seed: int) -> Dataset:
    """Concatenate sources; with weights, resample each to its share of the total (seeded, deterministic)."""
    if weights is None or len(parts) == 1:
        return concatenate_datasets(parts) if len(parts) > 1 else parts[0]
    total = sum(len(p) for p in parts)
    mixed = []
    for i, (part, weight) in enumerate(zip(parts, weights, strict=True)):
        n = max(1, round(total * weight / sum(weights)))
        order = np.random.default_rng([seed, i]).permutation(len(part))
        mixed.append(part.select(np.resize(order, n)))  # repeats a small source, subsamples a large one
    return concatenate_datasets(mixed)


def packed_dataset(
    sources: list[Source],
    data_format: DataFormat,
    tokenizer: PreTrainedTokenizerBase,
    *,
    seq_len: int,
    val_fraction: float,
    cache_dir: Path,
    num_proc: int | None = None,
    val_sources: list[Source] | None = None,
    seed: int = 0,
) -> DatasetDict:
    """Train/validation blocks. Validation is `val_sources` if given, else the last `val_fraction` of
    every training source; it is never shuffled into training."""
    train, validation = [], []
    for source in sources:
        blocks = packed_source(source, data_format, tokenizer, seq_len=seq_len, cache_dir=cache_dir, num_proc=num_proc)
        n_val = 0 if val_sources else max(1, round(len(blocks) * val_fraction))
        if len(blocks) - n_val < 1:
            raise ConfigError(f"{source.spec} packs into only {len(blocks)} blocks of {seq_len} tokens: too small")
        train.append(blocks.select(range(len(blocks) - n_val)))
        if n_val:
            validation.append(blocks.select(range(len(blocks) - n_val, len(blocks))))
    if val_sources:
        validation = [
            packed_source(s, data_format, tokenizer, seq_len=seq_len, cache_dir=cache_dir, num_proc=num_proc)
            for s in val_sources
        ]
    weights = [s.weight for s in sources] if sources[0].weight is not None else None
    splits = DatasetDict(train=mix(train, weights, seed), validation=mix(validation, None, seed))
    return splits.with_format("torch")


def wanted_eval_blocks(requested: int | None, seq_len: int, global_batch: int) -> int:
    """Validation blocks an evaluation asks for: `--eval-blocks`, or those holding EVAL_TOKENS tokens (at least one
    global batch)."""
    return requested or max(EVAL_TOKENS // seq_len, global_batch)


def evaluation_blocks(splits: DatasetDict, global_batch: int, seq_len: int, requested: int | None) -> int:
    """Validation blocks used per evaluation: `requested` or those holding EVAL_TOKENS tokens (all when there are
    fewer), cut to whole global batches (every evaluation step consumes one). Raises ConfigError when either split
    does not fill one global batch."""
    train, validation = len(splits["train"]), len(splits["validation"])
    if train < global_batch:
        raise ConfigError(
            f"{train} training blocks of {seq_len} tokens do not fill one global batch of {global_batch} sequences: "
            "use more data, a shorter --seq-len or a smaller train_batch_size"
        )
    blocks = min(wanted_eval_blocks(requested, seq_len, global_batch), validation)
    blocks -= blocks % global_batch
    if blocks == 0:
        raise ConfigError(
            f"{validation} validation blocks of {seq_len} tokens do not fill one global batch of "
            f"{global_batch} sequences: use a larger --val-fraction, --val-data, or a smaller train_batch_size"
        )
    return blocks
