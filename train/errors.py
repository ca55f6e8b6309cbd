"""How a run fails: one `error:` line, the same on every rank, and a documented exit code.

- `RunError` (and its `ConfigError` for bad input): an expected stop, such as a bad flag or a diverged
  loss. It prints `error: <what went wrong and the fix>` and exits with `EXIT_ERROR` (2).
- Any other exception is unexpected. Its traceback is appended to `<output-dir>/error.log`, the terminal
  shows `error: <Type>: <message> (traceback in <path>)`, and the run exits with `EXIT_UNEXPECTED` (1).
- `every_rank(fn)`: every rank runs `fn`, then the ranks agree. If any rank failed, every rank raises
  the first failure's line, so that no rank waits on a dead peer.
- `rank_zero_first(fn)`: rank 0 builds (a tokenizer, a data cache), then the others read what it built.
- `entry_point(fn, error_log)`: the one wrapper every command runs in. It turns failures into the line
  and the exit code.
"""

import os
import sys
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

import torch.distributed as dist

from train.distributed import preparation_group

T = TypeVar("T")
EXIT_ERROR = 2  # an `error:` line naming the problem and the fix: bad input, divergence, an unwritable checkpoint
EXIT_UNEXPECTED = 1  # a failure of a kind we do not anticipate: the traceback is in error.log
EXIT_HUNG = 3  # a peer stopped answering for --dist-timeout: stacks in <output-dir>/hang/rank<N>.txt
EXIT_PREEMPTED = 143  # stopped on SIGTERM/SIGINT after saving the step reached (128 + SIGTERM, as shells report it)


class RunError(Exception):
    """A run that cannot go on (bad input, a non-finite loss): reported as one `error:` line."""

    exit_code = EXIT_ERROR
    label = "error"  # the first word of the line


class ConfigError(RunError, ValueError):
    """Bad user input: flags, DeepSpeed JSON, data, checkpoints."""


class UnexpectedError(RunError):
    """An unexpected failure on some rank, as the line every rank reports (its traceback is in error.log)."""

    exit_code = EXIT_UNEXPECTED


_error_log: Path | None = None


def set_error_log(path: Path | None) -> None:
    """Where unexpected failures write their tracebacks (`<output-dir>/error.log`); None: to stderr."""
    global _error_log
    _error_log = path


def as_run_error(error: BaseException) -> RunError:
    """`error` as the one line to report. An unexpected kind of error has its traceback written first."""
    if isinstance(error, RunError):
        return error
    first_line = (str(error).strip().splitlines() or [""])[0]
    text = "".join(traceback.format_exception(error))
    where = _write_traceback(text)
    return UnexpectedError(f"{type(error).__name__}: {first_line} ({where})")


def _write_traceback(text: str) -> str:
    rank = dist.get_rank() if dist.is_initialized() else 0
    if _error_log is not None:
        try:
            _error_log.parent.mkdir(parents=True, exist_ok=True)
            with open(_error_log, "a") as f:  # one write per rank: the ranks' reports do not interleave
                f.write(f"--- rank {rank} (pid {os.getpid()}) ---\n{text}\n")
            return f"traceback in {_error_log}"
        except OSError:
            pass
    sys.stderr.write(text)
    return "traceback above"


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


def entry_point(fn: Callable[[], object], error_log: Path | None = None) -> int:
    """Run a command: 0 when it returns, else its failure as one `error:` line and the exit code.

    A RunError is the same on every rank (agreed by `agree`, or the same input failing everywhere), so only
    global rank 0 prints it. Any other exception stops this rank alone, which prints it; the launcher then
    ends the others."""
    set_error_log(error_log)
    try:
        fn()
        return 0
    except Exception as e:
        agreed = isinstance(e, RunError)
        failure = as_run_error(e)
    rank = dist.get_rank() if dist.is_initialized() else int(os.environ.get("RANK", "0"))
    if not agreed or rank == 0:
        print(f"{failure.label}: {failure}", file=sys.stderr, flush=True)
    return failure.exit_code
