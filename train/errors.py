"""How a run fails: one `error:` line, the same on every rank, and a documented exit code.

- `RunError` (and its `ConfigError` for bad input): an expected stop, such as a bad flag or a diverged
  loss. It prints `error: <what went wrong and the fix>` and exits with `EXIT_ERROR` (2).
- Any other exception is unexpected. Its traceback is appended to `<output-dir>/error.log`, the terminal
  shows `error: <Type>: <message> (traceback in <path>)`, and the run exits with `EXIT_UNEXPECTED` (1).
- `first_line(error)`: the one line an exception is reported by (safe on an empty message; models/errors.py).
- Agreement across ranks (`every_rank`, `rank_zero_first`) is in train/distributed/agreement.py.
- `entry_point(fn, error_log)`: the one wrapper every command runs in. It turns failures into the line
  and the exit code.
"""

import os
import sys
import tempfile
import traceback
from collections.abc import Callable
from pathlib import Path

import torch.distributed as dist

from models.errors import first_line

EXIT_ERROR = 2  # an `error:` line naming the problem and the fix: bad input, divergence, an unwritable checkpoint
EXIT_UNEXPECTED = 1  # a failure of a kind we do not anticipate: the traceback is in error.log
EXIT_HUNG = 3  # a peer stopped answering for --dist-timeout: stacks in <output-dir>/hang/rank<N>.txt
EXIT_INTERRUPTED = 130  # Ctrl-C before any rank trained (the preflight, a command): 128 + SIGINT
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
    text = "".join(traceback.format_exception(error))
    where = _write_traceback(text)
    message = first_line(error) if str(error).strip() else ""
    return UnexpectedError(f"{type(error).__name__}: {message} ({where})")


def _write_traceback(text: str) -> str:
    """The traceback into the error log: the run's `error.log`, or for a command without an output folder (the
    preflight, train.plan, train.export, train.generate) a file of its own in the temporary folder."""
    rank = dist.get_rank() if dist.is_initialized() else 0
    log = _error_log or Path(tempfile.gettempdir()) / f"pipegpt-error-{os.getpid()}.log"
    try:
        log.parent.mkdir(parents=True, exist_ok=True)
        with open(log, "a") as f:  # one write per rank: the ranks' reports do not interleave
            f.write(f"--- rank {rank} (pid {os.getpid()}) ---\n{text}\n")
        return f"traceback in {log}"
    except OSError as e:  # a full disk or a read-only folder: the one line still says what failed
        return f"its traceback could not be written to {log}: {e.strerror}"


def entry_point(fn: Callable[[], object], error_log: Path | None = None) -> int:
    """Run a command: 0 when it returns, else its failure as one `error:` line and the exit code.

    A RunError is the same on every rank (agreed by `agree`, or the same input failing everywhere), so only
    global rank 0 prints it. Any other exception stops this rank alone, which prints it; the launcher then
    ends the others."""
    set_error_log(error_log)
    try:
        fn()
        return 0
    except KeyboardInterrupt:  # Ctrl-C outside training (which saves and exits 143: distributed/preemption.py)
        print("error: interrupted (Ctrl-C) before training started: nothing was written", file=sys.stderr, flush=True)
        return EXIT_INTERRUPTED
    except Exception as e:
        agreed = isinstance(e, RunError)
        failure = as_run_error(e)
    rank = dist.get_rank() if dist.is_initialized() else int(os.environ.get("RANK", "0"))
    if not agreed or rank == 0:
        print(f"{failure.label}: {failure}", file=sys.stderr, flush=True)
    return failure.exit_code
