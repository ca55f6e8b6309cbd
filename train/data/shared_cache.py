"""The packed cache prepared once per job, split across its nodes.

When every node of a job sees the same data cache (a shared file system), the first rank of each node tokenizes a
contiguous shard of every source that is not cached yet (with `--num-proc` processes), writing it beside the cache
entry; then global rank 0 packs the shards, in order, into the entry, and removes them. The blocks are those one
process builds (tokenization is per record; packing reads the records in order). A shard already written by an
interrupted job is not tokenized again. When the nodes' caches are their own, each node builds its cache alone,
as one node does (train/distributed/agreement.py: rank_zero_first), and a line says so.
"""

import os
import shutil
import uuid
from pathlib import Path

import torch.distributed as dist
from datasets import concatenate_datasets, load_from_disk
from transformers import PreTrainedTokenizerBase

from train.data.examples import DataFormat
from train.data.packing import cache_entry, encoded_records, work_folder, write_entry
from train.data.sources import Source
from train.distributed.agreement import every_rank
from train.distributed.setup import preparation_group, rank, say


def node_leaders() -> list[int]:
    """The global rank of each node's first rank (LOCAL_RANK 0), in order: one per node."""
    local_ranks: list[int | None] = [None] * dist.get_world_size()
    dist.all_gather_object(local_ranks, int(os.environ.get("LOCAL_RANK", "0")), group=preparation_group())
    return [r for r, local in enumerate(local_ranks) if local == 0]


def cache_is_shared(cache_dir: Path, leaders: list[int]) -> bool:
    """Whether every node sees a file that rank 0 writes into `cache_dir`."""
    probe = [cache_dir / f".shared-probe-{uuid.uuid4().hex}" if rank() == 0 else None]
    dist.broadcast_object_list(probe, src=0, group=preparation_group())

    def write_probe() -> None:
        cache_dir.mkdir(parents=True, exist_ok=True)
        probe[0].write_text("written by global rank 0\n")

    every_rank(write_probe, run_here=rank() == 0, group=preparation_group())  # an unwritable cache: one line
    seen: list[bool | None] = [None] * dist.get_world_size()
    dist.all_gather_object(seen, probe[0].exists() if rank() in leaders else True, group=preparation_group())
    dist.barrier(group=preparation_group())
    if rank() == 0:
        probe[0].unlink()
    return all(seen)


def shard_folder(entry: Path, index: int, count: int) -> Path:
    return entry.with_name(entry.name + ".shards") / f"{index + 1}-of-{count}"


def tokenize_shard(
    source: Source,
    data_format: DataFormat,
    tokenizer: PreTrainedTokenizerBase,
    *,
    entry: Path,
    seq_len: int,
    num_proc: int | None,
    index: int,
    count: int,
) -> None:
    shard = shard_folder(entry, index, count)
    if shard.exists():
        return
    with work_folder(entry) as work:
        encoded = encoded_records(
            source, data_format, tokenizer, seq_len=seq_len, num_proc=num_proc, work_dir=work, shard=(index, count)
        )
        shard.parent.mkdir(exist_ok=True)
        tmp = shard.with_name(shard.name + f".tmp{os.getpid()}")
        encoded.save_to_disk(str(tmp))
        os.replace(tmp, shard)
    print(f"{source.spec}: tokenized shard {index + 1}/{count} ({len(encoded):,} records) on node {index}", flush=True)


def pack_shards(
    source: Source,
    data_format: DataFormat,
    tokenizer: PreTrainedTokenizerBase,
    *,
    entry: Path,
    seq_len: int,
    count: int,
) -> None:
    shards = [load_from_disk(str(shard_folder(entry, i, count))) for i in range(count)]
    write_entry(
        entry,
        source,
        encoded=concatenate_datasets(shards),
        data_format=data_format,
        tokenizer=tokenizer,
        seq_len=seq_len,
    )
    shutil.rmtree(shard_folder(entry, 0, count).parent, ignore_errors=True)


def build_across_nodes(
    source: Source,
    data_format: DataFormat,
    tokenizer: PreTrainedTokenizerBase,
    *,
    node: int | None,
    entry: Path,
    seq_len: int,
    num_proc: int | None,
    count: int,
) -> None:
    """Every node's first rank (`node`: its index; None elsewhere) tokenizes its shard, then rank 0 packs them; a
    collective."""
    every_rank(
        lambda: tokenize_shard(
            source, data_format, tokenizer, entry=entry, seq_len=seq_len, num_proc=num_proc, index=node, count=count
        ),
        run_here=node is not None,
        group=preparation_group(),
    )
    every_rank(
        lambda: pack_shards(source, data_format, tokenizer, entry=entry, seq_len=seq_len, count=count),
        run_here=rank() == 0,
        group=preparation_group(),
    )


def tokenize_once_per_job(
    sources: list[Source],
    data_format: DataFormat,
    tokenizer: PreTrainedTokenizerBase,
    *,
    cache_dir: Path,
    seq_len: int,
    num_proc: int | None,
) -> None:
    """Fill the cache entries that are missing, a shard per node, when the nodes share the cache; a collective.
    Afterwards rank_zero_first(prepare the data) finds every entry built."""
    leaders = node_leaders()
    if len(leaders) == 1:
        return
    entries = [
        cache_entry(cache_dir, s, data_format=data_format, tokenizer=tokenizer, seq_len=seq_len) for s in sources
    ]
    missing = [not entry.exists() for entry in entries]
    dist.broadcast_object_list(missing, src=0, group=preparation_group())  # as rank 0 sees the cache
    if not any(missing):
        return
    if not cache_is_shared(cache_dir, leaders):
        say(
            f"the data cache {cache_dir} is not shared by the {len(leaders)} nodes: each node tokenizes the data "
            "itself (a --data-cache-dir on a shared file system tokenizes it once, split across the nodes)"
        )
        return
    node = leaders.index(rank()) if rank() in leaders else None
    for source, entry, build in zip(sources, entries, missing, strict=True):
        if build:
            build_across_nodes(
                source,
                data_format,
                tokenizer,
                node=node,
                entry=entry,
                seq_len=seq_len,
                num_proc=num_proc,
                count=len(leaders),
            )
