"""The divergence policy: a step whose loss, or whose gradient without fp16 loss scaling, is not finite stops the
run, without saving."""

import math
from collections.abc import Callable

from train.errors import RunError


def diverged(loss: float, grad_norm: float, *, fp16: bool) -> bool:
    """Whether the loss, or the gradient without fp16 loss scaling, is not finite: without loss scaling a
    non-finite gradient is no overflow to skip, the run has diverged."""
    return not math.isfinite(loss) or (not fp16 and not math.isfinite(grad_norm))


def stop_if_diverged(
    step: int, loss: float, grad_norm: float, *, fp16: bool, last_checkpoint: Callable[[], str | None]
) -> None:
    """Raise (no checkpoint is saved) when the run has diverged (`diverged`). `last_checkpoint` names the newest
    checkpoint for the message; it is called only then (it reads the checkpoint folder)."""
    if diverged(loss, grad_norm, fp16=fp16):
        raise RunError(
            f"loss {loss:g}, gradient norm {grad_norm:g} at step {step}: stopped without saving; the last "
            f"checkpoint is {last_checkpoint() or 'none'} (lower the LR or check the data)"
        )
