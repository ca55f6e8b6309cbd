"""Sources -> `datasets` -> blocks of `seq_len` tokens, cached on disk (split into training and validation by
train/data/splits.py).

Plain text: documents are joined with EOS and cut into blocks; each block is both the input and
the label (the loss shifts by one, as `GPT2LMHeadModel` does). Every block also stores each token's position
in its document (0 at a document's first token and at the block's first token, a document cut by the block
boundary continuing as a document of its own): `--attention document` feeds those positions to the model.
The tokens left over at the end of a source (fewer than one block) are dropped and counted. Instruction and chat data
become blocks with their own labels (train/data/examples.py).
"""

import hashlib
import json
import os
import shutil
import socket
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pyarrow as pa
from datasets import Dataset, Features, Sequence, Value, load_from_disk
from transformers import PreTrainedTokenizerBase

from train.data.example_packing import PACK_BATCH, describe, pack_encoded
from train.data.examples import MAP_BATCH, DataFormat, encode_records
from train.data.preference import encode_pair_records
from train.data.sources import Source, load_columns, load_texts
from train.distributed.preemption import process_alive
from train.errors import ConfigError

CACHE_FORMAT = 3  # bump when the packing changes, so that old caches are not served
STATS = "pipegpt_stats.json"  # in every cache entry: its counts and the sizes of its files


def document_ids(texts: list, tokenizer: PreTrainedTokenizerBase) -> list[list[int]]:
    """Tokenize a batch of documents (blank ones skipped, every one followed by EOS); the cached and the streaming
    paths both cut text this way."""
    docs = [t for t in texts if t is not None and t.strip()]  # strings: checked as read (train/data/sources.py)
    # verbose=False: documents longer than the model's context are expected (they are cut into blocks); transformers
    # would warn that they "will result in indexing errors".
    encoded = tokenizer(docs, add_special_tokens=False, return_attention_mask=False, verbose=False) if docs else None
    return [doc + [tokenizer.eos_token_id] for doc in encoded["input_ids"]] if docs else []


class TokenPacker:
    """Cuts a stream of documents into `seq_len` blocks in order, carrying the unfinished block from one call to
    the next: the blocks depend only on the token stream, never on how it was batched."""

    def __init__(self, seq_len: int, carry: list[list[int]] | None = None):
        self.seq_len = seq_len
        tokens, starts = carry or ([], [])
        self.carry = np.asarray(tokens, dtype=np.int32)  # tokens of the current, unfinished block
        self.carry_starts = np.asarray(starts, dtype=bool)  # which of them start a document

    def pack(self, flat: np.ndarray, starts: np.ndarray) -> dict[str, np.ndarray]:
        """More tokens (and the flags of those that start a document) -> the blocks they complete."""
        flat = np.concatenate([self.carry, flat.astype(np.int32, copy=False)])
        starts = np.concatenate([self.carry_starts, starts])
        n = len(flat) // self.seq_len * self.seq_len
        self.carry, self.carry_starts = flat[n:], starts[n:]
        return {
            "input_ids": flat[:n].reshape(-1, self.seq_len),
            "position_ids": document_positions(starts[:n].reshape(-1, self.seq_len)),
        }

    def pack_documents(self, docs: list[list[int]]) -> dict[str, np.ndarray]:
        lengths = np.fromiter((len(d) for d in docs), dtype=np.int64, count=len(docs))
        starts = np.zeros(int(lengths.sum()), dtype=bool)
        starts[np.cumsum(lengths) - lengths] = True  # documents are never empty: each ends with EOS
        flat = np.fromiter((t for d in docs for t in d), dtype=np.int32, count=len(starts))
        return self.pack(flat, starts)

    def state(self) -> list[list]:
        return [self.carry.tolist(), self.carry_starts.tolist()]


def tokenize_texts(texts: Dataset, tokenizer: PreTrainedTokenizerBase, num_proc: int | None) -> Dataset:
    """Documents -> their token ids, EOS appended (batched, multi-process `map`)."""
    return texts.map(
        lambda batch: {"input_ids": document_ids(batch["text"], tokenizer)},
        batched=True,
        batch_size=MAP_BATCH,
        remove_columns=texts.column_names,
        features=Features({"input_ids": Sequence(Value("int32"))}),
        num_proc=num_proc if num_proc and num_proc > 1 and len(texts) > MAP_BATCH * num_proc else None,
        desc="tokenizing",
    )


def pack_tokenized(tokenized: Dataset, seq_len: int) -> tuple[Dataset, int]:
    """Tokenized documents (in order) -> `seq_len` blocks, and the number of tokens left over at the very end."""
    packer = TokenPacker(seq_len)

    def pack_into_blocks(batch: pa.Table) -> dict:
        docs = batch["input_ids"].combine_chunks()
        starts = np.zeros(len(docs.values), dtype=bool)
        starts[docs.offsets.to_numpy()[:-1]] = True  # documents are never empty: each ends with EOS
        return packer.pack(docs.flatten().to_numpy(), starts)

    blocks = tokenized.with_format("arrow").map(
        pack_into_blocks,
        batched=True,
        batch_size=PACK_BATCH,
        load_from_cache_file=False,  # the leftover count is computed while packing
        features=Features(
            {
                "input_ids": Sequence(Value("int32"), length=seq_len),
                "position_ids": Sequence(Value("int32"), length=seq_len),
            }
        ),
        desc=f"packing into {seq_len}-token blocks",
    )
    return blocks.with_format(None), len(packer.carry)


def tokenize_and_pack(
    texts: Dataset, tokenizer: PreTrainedTokenizerBase, seq_len: int, num_proc: int | None
) -> tuple[Dataset, int]:
    """Tokenize, append EOS to every document, then pack the token stream into `seq_len` blocks in order. Returns
    the blocks and the number of tokens left over at the very end (fewer than one block). The blocks do not depend
    on `num_proc`."""
    return pack_tokenized(tokenize_texts(texts, tokenizer, num_proc), seq_len)


def document_positions(starts: np.ndarray) -> np.ndarray:
    """[blocks, seq_len] flags of the tokens that start a document -> each token's position in its document,
    counted from the last start in its block (a block's first token always starts one)."""
    starts = starts.copy()
    starts[:, 0] = True
    index = np.arange(starts.shape[1])
    return (index - np.maximum.accumulate(np.where(starts, index, 0), axis=1)).astype(np.int32)


def cache_key(source: Source, data_format: DataFormat, tokenizer: PreTrainedTokenizerBase, seq_len: int) -> str:
    tokenizer_state = tokenizer.backend_tokenizer.to_str() if tokenizer.is_fast else repr(tokenizer.get_vocab())
    how = data_format.cache_fields(tokenizer) if data_format.masked else data_format.text_column
    blob = [CACHE_FORMAT, source.fingerprint(), how, tokenizer_state, tokenizer.eos_token_id, seq_len]
    return hashlib.sha256(json.dumps(blob).encode()).hexdigest()[:20]


def default_cache_dir() -> Path:
    return Path(os.environ.get("PIPEGPT_CACHE", Path.home() / ".cache" / "pipegpt")) / "packed"


def cache_entry(
    cache_dir: Path, source: Source, data_format: DataFormat, tokenizer: PreTrainedTokenizerBase, *, seq_len: int
) -> Path:
    return cache_dir / cache_key(source, data_format, tokenizer, seq_len)


@contextmanager
def work_folder(entry: Path) -> Iterator[Path]:
    """A folder beside a cache entry for everything `datasets` writes while building it (the Arrow copy of the
    files, the tokenized records), removed when the entry is done or the build fails: the packed blocks are the one
    copy left. Work folders that a killed build on this host left behind are removed first."""
    entry.parent.mkdir(parents=True, exist_ok=True)
    mine = f"{entry.name}.work-{socket.gethostname()}-"
    for stale in entry.parent.glob(f"{mine}*"):
        if not process_alive(int(stale.name.removeprefix(mine).split("-")[0])):
            shutil.rmtree(stale, ignore_errors=True)
    work = Path(tempfile.mkdtemp(dir=entry.parent, prefix=f"{mine}{os.getpid()}-"))
    try:
        yield work
    finally:
        shutil.rmtree(work, ignore_errors=True)


def encoded_records(
    source: Source,
    data_format: DataFormat,
    tokenizer: PreTrainedTokenizerBase,
    *,
    seq_len: int,
    num_proc: int | None,
    work_dir: Path,
    shard: tuple[int, int] | None = None,
) -> Dataset:
    """One source's records, tokenized (text) or rendered and encoded (instruction and chat data): the costly part
    of preparing it. `shard` (index, count): only that contiguous share of the records; the shards in order are
    the whole."""
    if data_format.masked:
        records = load_columns(source, data_format.columns(), work_dir)
    else:
        records = load_texts(source, data_format.text_column, work_dir)
    if shard is not None:
        records = records.shard(num_shards=shard[1], index=shard[0], contiguous=True)
    if data_format.kind == "preference":
        return encode_pair_records(records, data_format, tokenizer, seq_len=seq_len, num_proc=num_proc)
    if data_format.masked:
        return encode_records(records, data_format, tokenizer, seq_len=seq_len, num_proc=num_proc)
    return tokenize_texts(records, tokenizer, num_proc)


def write_entry(
    entry: Path,
    source: Source,
    *,
    encoded: Dataset,
    data_format: DataFormat,
    tokenizer: PreTrainedTokenizerBase,
    seq_len: int,
) -> None:
    """Pack a source's encoded records (in order) into its cache entry, written whole or not at all."""
    if data_format.masked:
        blocks, stats = pack_encoded(source, encoded, data_format, tokenizer, seq_len=seq_len)
        print(describe(source.spec, stats, data_format, seq_len), flush=True)
    else:
        blocks, dropped = pack_tokenized(encoded, seq_len)
        if len(blocks) == 0:
            raise ConfigError(f"{source.spec} holds fewer than {seq_len} tokens of text: nothing to train on")
        tokens = len(blocks) * seq_len
        print(f"{source.spec}: {tokens:,} tokens in {len(blocks):,} blocks, {dropped} left over", flush=True)
        stats = {"blocks": len(blocks), "tokens": tokens, "dropped_tokens": dropped}
    tmp = entry.with_name(entry.name + f".tmp{os.getpid()}")
    blocks.save_to_disk(str(tmp))
    stats["file_sizes"] = {f.name: f.stat().st_size for f in sorted(tmp.iterdir()) if f.is_file()}
    (tmp / STATS).write_text(json.dumps(stats))
    os.replace(tmp, entry) if not entry.exists() else shutil.rmtree(tmp)


def check_entry(entry: Path) -> None:
    """An entry's files have the sizes they were written with (a copy cut short, a full disk, a file removed):
    else one line naming it and the fix, instead of an Arrow error deep in training."""
    sizes = json.loads((entry / STATS).read_text()).get("file_sizes", {}) if (entry / STATS).is_file() else {}
    for name, size in sizes.items():
        found = (entry / name).stat().st_size if (entry / name).is_file() else None
        if found != size:
            raise ConfigError(
                f"the data cache entry {entry} is damaged ({name}: {'missing' if found is None else f'{found:,} bytes'}"
                f", written with {size:,}): remove the folder and run again to rebuild it"
            )


def packed_source(
    source: Source,
    data_format: DataFormat,
    tokenizer: PreTrainedTokenizerBase,
    *,
    seq_len: int,
    cache_dir: Path,
    num_proc: int | None = None,
) -> Dataset:
    """All blocks of one source, built once per (source files, format, tokenizer, seq_len), memory-mapped after."""
    entry = cache_entry(cache_dir, source, data_format, tokenizer, seq_len=seq_len)
    if not entry.exists():
        with work_folder(entry) as work:
            encoded = encoded_records(source, data_format, tokenizer, seq_len=seq_len, num_proc=num_proc, work_dir=work)
            write_entry(entry, source, encoded=encoded, data_format=data_format, tokenizer=tokenizer, seq_len=seq_len)
    check_entry(entry)
    return load_from_disk(str(entry))
