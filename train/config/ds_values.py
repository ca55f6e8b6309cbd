"""The values of the DeepSpeed JSON's `optimizer.params` and `scheduler.params`, checked by building what DeepSpeed
builds from them, on one dummy parameter, before any rank starts.

DeepSpeed 0.19.8 hands these dictionaries as keyword arguments to the optimizer class it picks (engine.py:
`_configure_basic_optimizer`: torch's AdamW/Adam for "AdamW"/"Adam" with `torch_adam`, otherwise FusedAdam on GPUs or
DeepSpeedCPUAdam with ZeRO offload, which validate as torch's do; a `torch.optim` class by its name) and to one of
its LR schedules (lr_schedules.py) inside `deepspeed.initialize`: a value out of range (a negative learning rate, a
beta of 1, `"warmup_num_steps": 0`) was a traceback on every rank after the model had loaded. The names and types of
the keys are checked before this (ds_schema.py: `check_parameters`).
"""

import logging
from pathlib import Path

from train.errors import ConfigError, first_line

# Keys DeepSpeed pops before it builds torch's Adam/AdamW, or that only its fused kernels take.
NOT_TORCH_ADAM = ("torch_adam", "adam_w_mode", "fp32_optimizer_states", "bias_correction", "set_grad_none")
# lr_schedules.py (0.19.8) falls back to "log" with a warning on any other warmup_type.
WARMUP_TYPES = ("log", "linear")


def dummy_optimizer(config: dict, path: Path):
    """The optimizer DeepSpeed would build, on one parameter (torch's class where DeepSpeed may pick a fused one
    with the same ranges); a plain SGD when the type is none of torch's (DeepSpeed's Lamb, 1-bit Adam, ...)."""
    import torch

    section = config.get("optimizer", {})
    name, params = str(section.get("type", "")), dict(section.get("params", {}))
    dummy = [torch.nn.Parameter(torch.zeros(1))]
    if name.lower() in ("adam", "adamw"):
        cls, params = torch.optim.AdamW, drop(params, NOT_TORCH_ADAM)  # Adam's ranges are AdamW's
    elif name and hasattr(torch.optim, name):
        cls = getattr(torch.optim, name)
    else:
        return torch.optim.SGD(dummy, lr=float(params.get("lr", 1e-3)) if is_number(params.get("lr")) else 1e-3)
    try:
        return cls(dummy, **params)
    except (ValueError, TypeError, RuntimeError) as e:
        raise ConfigError(
            f'DeepSpeed config {path}: "optimizer.params" rejected by torch.optim.{cls.__name__}: {first_line(e)}'
        ) from None


def check_parameter_values(config: dict, path: Path) -> None:
    """A ConfigError line naming the section and the class that rejects a value of `optimizer.params` or
    `scheduler.params` (with "auto" already resolved)."""
    from deepspeed.runtime import lr_schedules
    from deepspeed.utils import logger

    optimizer = dummy_optimizer(config, path)
    section = config.get("scheduler", {})
    name, params = str(section.get("type", "")), dict(section.get("params", {}))
    if not name or not hasattr(lr_schedules, name):
        return
    if params.get("warmup_type", "log") not in WARMUP_TYPES:
        raise ConfigError(
            f'DeepSpeed config {path}: "scheduler.params.warmup_type" must be one of {", ".join(WARMUP_TYPES)}, not '
            f"{params['warmup_type']!r} (DeepSpeed would use log in its place)"
        )
    level = logger.level
    logger.setLevel(logging.ERROR)  # its warnings are the ranks' to print, once, where the run is
    try:
        getattr(lr_schedules, name)(optimizer, **params)
    except (ValueError, TypeError, ZeroDivisionError) as e:
        raise ConfigError(f'DeepSpeed config {path}: "scheduler.params" rejected by {name}: {first_line(e)}') from None
    finally:
        logger.setLevel(level)


def drop(params: dict, keys: tuple[str, ...]) -> dict:
    return {k: v for k, v in params.items() if k not in keys}


def is_number(value: object) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)
