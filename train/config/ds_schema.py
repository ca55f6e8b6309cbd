"""The whole DeepSpeed JSON checked against DeepSpeed's own config classes before any rank starts.

`DeepSpeedConfig` (0.19.8) validates its newer sections with pydantic models that forbid unknown keys
(`zero_optimization`, `bf16`, `fp16`, `compile`, the monitors, ...) but reads the top level and its older
sections (`checkpoint`, `activation_checkpointing`, `pipeline`, ...) with `dict.get(key, default)`: an unknown
or misspelt key there is silently ignored, and a string where a number belongs fails inside `initialize` on
every rank. We let DeepSpeed read the JSON through a dict that records every key it asks for and the default
it asks with: a present key never asked for is unknown (with the nearest key DeepSpeed did ask for), a value
whose type differs from its default's is ill-typed. `optimizer.params` and `scheduler.params` are passed later
as keyword arguments to the optimizer and schedule classes DeepSpeed picks: they are checked against those
classes' signatures (every Adam class DeepSpeed may pick for "Adam"/"AdamW"; a `torch.optim` class; one of
DeepSpeed's schedules), names and the types of their defaults.
"""

import difflib
import inspect
import json
import logging
import typing
from pathlib import Path

from train.errors import ConfigError, first_line

READ_LATER = ("optimizer.params", "scheduler.params")


class ReadKeys(dict):
    """A JSON object that records, in `log` shared with its nested objects, every key path read from it and the
    default it was read with."""

    def __init__(self, data: dict, prefix: str = "", log: dict | None = None):
        super().__init__(data)
        self.prefix, self.log = prefix, {} if log is None else log

    def _read(self, key: object, default: object = None) -> object:
        path = self.prefix + str(key)
        if default is not None or path not in self.log:  # keep the default a key is read with
            self.log[path] = default
        value = super().get(key, default)
        if isinstance(value, dict) and not isinstance(value, ReadKeys) and path not in READ_LATER:
            value = ReadKeys(value, path + ".", self.log)
            if super().__contains__(key):
                super().__setitem__(key, value)
        return value

    def get(self, key: object, default: object = None) -> object:
        return self._read(key, default)

    def __getitem__(self, key: object) -> object:
        if not super().__contains__(key):
            raise KeyError(key)
        return self._read(key)

    def __iter__(self):
        # Overridden so that `**section` (how DeepSpeed hands a section to its pydantic model) takes the slow
        # path through keys() and __getitem__, which records every key of it.
        return super().__iter__()

    def __contains__(self, key: object) -> bool:
        self.log.setdefault(self.prefix + str(key), None)
        return super().__contains__(key)


def present_paths(config: dict, prefix: str = "") -> list[tuple[str, object]]:
    """(path, value) of every key in the JSON, nested objects included (not their read-later parameters)."""
    paths = []
    for key, value in config.items():
        path = prefix + str(key)
        paths.append((path, value))
        if isinstance(value, dict) and path not in READ_LATER:
            paths += present_paths(value, path + ".")
    return paths


def pydantic_line(error, config: dict) -> str:
    """`"section.key": what is wrong` from a pydantic error of one of DeepSpeed's section models."""
    from deepspeed.runtime.config_utils import DeepSpeedConfigModel

    first = error.errors()[0]
    loc = [str(part) for part in first["loc"]]
    model = next((m for m in all_models(DeepSpeedConfigModel) if m.__name__ == error.title), None)
    section = []
    if loc and loc[0] not in config and model is not None:  # a section's model: which section failed it
        failing = [k for k, v in config.items() if isinstance(v, dict) and loc[0] in v and not validates(model, v)]
        # Prefer the section named like the model (CompileConfig: "compile", DeepSpeedZeroConfig: "zero_...").
        stem = model.__name__.lower().removeprefix("deepspeed").removesuffix("config")
        section = sorted(failing, key=lambda k: not k.startswith(stem))[:1]
    line = f'"{".".join(section + loc)}": {first["msg"]}'
    if (section + loc)[0] == "compile":
        line += " (this block configures DeepCompile; torch.compile of every pipeline layer is pipegpt's --compile)"
    if first["type"] != "extra_forbidden":
        return line + f" (got {json.dumps(first.get('input'), default=str)})"
    for part in loc[:-1]:  # down to the model that holds the unknown key
        field = model.model_fields.get(part) if model is not None else None
        annotation = getattr(field, "annotation", None)  # a model, or Optional[model]
        types = [annotation, *typing.get_args(annotation)]
        model = next((t for t in types if isinstance(t, type) and issubclass(t, DeepSpeedConfigModel)), None)
    if model is None:
        return line
    fields = sorted(model.model_fields)
    near = difflib.get_close_matches(loc[-1], fields, n=1)
    if near:
        return line + f'; did you mean "{near[0]}"?'
    return line + f"; DeepSpeed accepts there: {', '.join(fields[:12])}{', ...' if len(fields) > 12 else ''}"


def validates(model: type, value: dict) -> bool:
    try:
        model(**value)
    except Exception:
        return False
    return True


def all_models(base: type) -> list[type]:
    found = []
    for sub in base.__subclasses__():
        found += [sub, *all_models(sub)]
    return found


def ill_typed(path: str, value: object, default: object, owner: str = "DeepSpeed") -> str | None:
    """Why `value` cannot stand where `owner` reads a bool, whole number or number (its default's type)."""
    if value is None or not isinstance(default, bool | int | float):
        return None
    if isinstance(default, bool):  # 0 and 1 too, as DeepSpeed's pydantic sections take them
        ok, what = isinstance(value, bool) or value in (0, 1), "true or false"
    else:  # an int default may stand for any number (torch's momentum=0, weight_decay=0)
        ok, what = isinstance(value, int | float) and not isinstance(value, bool), "a number"
    if ok:
        return None
    return f'"{path}" must be {what} ({owner}\'s default: {json.dumps(default)}), not {json.dumps(value)}'


def keyword_defaults(classes: list) -> dict[str, object]:
    """{keyword: default (None when it has none)} of the classes' constructors, past the parameters/optimizer."""
    keywords: dict[str, object] = {}
    for cls in classes:
        for name, parameter in list(inspect.signature(cls.__init__).parameters.items())[2:]:
            if parameter.kind in (parameter.KEYWORD_ONLY, parameter.POSITIONAL_OR_KEYWORD):
                empty = parameter.default is inspect.Parameter.empty
                keywords.setdefault(name, None if empty else parameter.default)
    return keywords


def parameter_classes(config: dict) -> dict[str, tuple[str, dict]]:
    """{"optimizer.params" / "scheduler.params": (what takes them, their keywords)} for the classes known here."""
    import torch
    from deepspeed.runtime import lr_schedules

    found = {}
    optimizer = str(config.get("optimizer", {}).get("type", ""))
    if optimizer.lower() in ("adam", "adamw"):  # DeepSpeed picks one of these by torch_adam, ZeRO offload, ...
        from deepspeed.ops.adam import DeepSpeedCPUAdam, FusedAdam

        keywords = keyword_defaults([torch.optim.AdamW, torch.optim.Adam, FusedAdam, DeepSpeedCPUAdam])
        keywords.update(torch_adam=False, adam_w_mode=True, fp32_optimizer_states=None)  # popped by DeepSpeed
        found["optimizer.params"] = (optimizer, keywords)
    elif optimizer and hasattr(torch.optim, optimizer):
        found["optimizer.params"] = (f"torch.optim.{optimizer}", keyword_defaults([getattr(torch.optim, optimizer)]))
    scheduler = str(config.get("scheduler", {}).get("type", ""))
    if scheduler and hasattr(lr_schedules, scheduler):
        found["scheduler.params"] = (scheduler, keyword_defaults([getattr(lr_schedules, scheduler)]))
    return found


def check_parameters(config: dict, path: Path) -> None:
    for section, (taker, keywords) in parameter_classes(config).items():
        params = config[section.partition(".")[0]].get("params", {})
        for key, value in params.items():
            key_path = f"{section}.{key}"
            if key not in keywords:
                near = difflib.get_close_matches(key, list(keywords), n=1)
                hint = f'; did you mean "{near[0]}"?' if near else f"; it takes: {', '.join(sorted(keywords))}"
                if key == "max_grad_norm":
                    hint = '; clipping is the top-level "gradient_clipping"'
                if taker.lower() in ("adam", "adamw"):
                    taker += " (torch's AdamW/Adam or DeepSpeed's FusedAdam/CPUAdam)"
                raise ConfigError(f'DeepSpeed config {path}: "{key_path}" is not a parameter of {taker}{hint}')
            if problem := ill_typed(key_path, value, keywords[key], taker):
                raise ConfigError(f"DeepSpeed config {path}: {problem}")


def check_optimizer_values(config: dict, path: Path) -> None:
    """The optimizer's values, as torch's class checks them when built (a negative lr, betas outside [0, 1)):
    built here on one parameter, before any rank builds it (for "Adam"/"AdamW", torch's AdamW: DeepSpeed's
    FusedAdam and CPUAdam take the same values)."""
    import torch

    optimizer = str(config.get("optimizer", {}).get("type", ""))
    cls = torch.optim.AdamW if optimizer.lower() in ("adam", "adamw") else getattr(torch.optim, optimizer, None)
    if not isinstance(cls, type):
        return
    takes = keyword_defaults([cls])
    params = {k: v for k, v in config["optimizer"].get("params", {}).items() if k in takes}
    try:
        cls([torch.nn.Parameter(torch.zeros(1))], **params)
    except (ValueError, TypeError) as e:
        reason = first_line(e)
        raise ConfigError(
            f'DeepSpeed config {path}: "optimizer.params": torch.optim.{cls.__name__}: {reason}'
        ) from None


def check_with_deepspeed(config: dict, path: Path) -> None:
    """One ConfigError line naming the first key DeepSpeed's config rejects, does not know, or reads as
    another type. The batch sizes (checked by `batch_layout` for the real world size) are set to agree."""
    import torch.distributed as dist
    from deepspeed import __version__
    from deepspeed.runtime.config import DeepSpeedConfig
    from deepspeed.utils import logger
    from pydantic import ValidationError

    world = dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1
    micro = config.get("train_micro_batch_size_per_gpu") or 1
    probe = ReadKeys({**config, "train_batch_size": micro * world, "gradient_accumulation_steps": 1})
    level = logger.level
    logger.setLevel(logging.ERROR)  # its info lines ("Config mesh_device None world_size = 1") are ours to skip
    try:
        DeepSpeedConfig(probe)
    except ValidationError as e:
        raise ConfigError(f"DeepSpeed config {path}: {pydantic_line(e, config)}") from None
    except Exception as e:  # DeepSpeedConfigError, assertions and ValueErrors of its older sections
        reason = first_line(e)
        raise ConfigError(f"DeepSpeed config {path}: DeepSpeed {__version__} rejects it: {reason}") from None
    finally:
        logger.setLevel(level)
    read_sections = {p.rpartition(".")[0] for p in probe.log}
    for key_path, value in present_paths(config):
        section, _, key = key_path.rpartition(".")
        if key_path not in probe.log and section in read_sections | {""}:
            known = [p.rpartition(".")[2] for p in probe.log if p.rpartition(".")[0] == section]
            near = difflib.get_close_matches(key, known, n=1)
            hint = f'; did you mean "{near[0]}"?' if near else ""
            raise ConfigError(f'DeepSpeed config {path}: DeepSpeed {__version__} does not know "{key_path}"{hint}')
        if key_path in probe.log and (problem := ill_typed(key_path, value, probe.log[key_path])):
            raise ConfigError(f"DeepSpeed config {path}: {problem}")
    check_parameters(config, path)
    check_optimizer_values(config, path)
