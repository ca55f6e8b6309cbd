"""Agreement across ranks: a failure on any rank stops every rank with the same line, so that no rank waits on
a dead peer.

- `every_rank(fn)`: every rank runs `fn`, then the ranks agree. If any rank failed, every rank raises the first
  failure's line.
- `rank_zero_first(fn)`: rank 0 builds (a tokenizer, a data cache), then the others read what it built.
"""

import os
from collections.abc import Callable
from typing import TypeVar

import torch.distributed as dist

from train.distributed.setup import preparation_group
from train.errors import ConfigError, RunError, UnexpectedError, as_run_error

T = TypeVar("T")


def agree(failure: RunError | None, group: dist.ProcessGroup | None = None) -> None:
    """A collective: if any rank brings a failure, every rank raises the first one (same class, same line)."""
    reports: list[tuple[str, str] | None] = [None] * dist.get_world_size()
    dist.all_gather_object(reports, (type(failure).__name__, str(failure)) if failure else None, group=group)
    first = next((r for r in reports if r), None)
    if first:
        kinds = {kind.__name__: kind for kind in (RunError, ConfigError, UnexpectedError)}
        raise kinds.get(first[0], RunError)(first[1])


def every_rank(fn: Callable[[], T], run_here: bool = True, group: dist.ProcessGroup | None = None) -> T | None:
    """Run `fn` on this rank (when `run_here`), then agree (on `group`, default the world): a failure on any rank
    stops every rank."""
    result, failure = None, None
    if run_here:
        try:
            result = fn()
        except Exception as e:
            failure = as_run_error(e)
    agree(failure, group)
    return result


def rank_zero_first(fn: Callable[[], T]) -> T:
    """Run `fn` on global rank 0 (it fills caches, trains the tokenizer, downloads), then on the first rank
    of every other node (which finds the work done on a shared filesystem, or does it once for its node),
    then on all the others, which read what is on disk. A failure on any rank stops every rank."""
    rank, local_rank = dist.get_rank(), int(os.environ.get("LOCAL_RANK", "0"))
    result = None
    for turn in (rank == 0, rank != 0 and local_rank == 0, local_rank != 0):
        done = every_rank(fn, run_here=turn, group=preparation_group())
        result = done if turn else result
    return result
