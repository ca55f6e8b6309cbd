"""Test-only fault injection behind one switch: the environment variable `PIPEGPT_FAULT=<point>`.

The tests use it to prove that failures at the worst moments lose nothing and end every rank with
one line. Unset (always, outside the tests), every call here returns at once. The points:

- `prepare-data`: global rank 0 raises a RuntimeError (an unexpected kind of failure) while it
  prepares the packed data, before any other rank reads it.
- `save:step_N`: during the save of checkpoint step_N, every rank writes its layer files, then
  kills itself with SIGKILL, as a lost node would, before the checkpoint is complete.
- `stall:<point>` (e.g. `stall:prepare-data`): a rank that reaches the point prints a line and waits there for
  STALL_S seconds, as a long preparation does (to kill launch.sh while the data is prepared).
- `empty-error:checkpoint`, `empty-error:model`, `empty-error:config`: while loading a checkpoint, the
  pretrained weights or the model config, the library call raises an exception with an empty message
  (a bare `assert` in DeepSpeed, say), of the kind that load reports as bad input.
"""

import os
import signal
import time
from collections.abc import Callable

import torch.distributed as dist

SWITCH = "PIPEGPT_FAULT"
STALL_S = 120


def inject_fault(
    point: str, first_half: Callable[[], object] | None = None, raises: type[Exception] = RuntimeError
) -> None:
    """If the switch names `point`: do `first_half` of the work, then fail the way the point documents
    (`raises`: the exception of an `empty-error:` point)."""
    if os.environ.get(SWITCH) == f"stall:{point}":
        print(f"fault: stalling at {point} ({SWITCH})", flush=True)
        time.sleep(STALL_S)
        return
    if os.environ.get(SWITCH) != point:
        return
    if point.startswith("empty-error:"):
        raise raises()
    if point == "prepare-data":
        if not dist.is_initialized() or dist.get_rank() == 0:
            raise RuntimeError(f"fault injected by {SWITCH}={point}")
        return
    if first_half is not None:
        first_half()
    os.kill(os.getpid(), signal.SIGKILL)
