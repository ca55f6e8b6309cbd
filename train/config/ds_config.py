"""Reading and checking the DeepSpeed JSON before any work starts.

The JSON is the single place for batch sizes, precision, ZeRO, optimizer, scheduler
and clipping; Python only fills `"auto"` in the scheduler's step count from
`--train-steps` and refuses combinations DeepSpeed would fail on deep inside.
"""

import json
from dataclasses import dataclass
from pathlib import Path

from train.config.ds_schema import check_with_deepspeed
from train.config.ds_values import check_parameter_values
from train.errors import ConfigError


def load_ds_config(path: str | Path, train_steps: int) -> dict:
    path = Path(path)
    try:
        config = json.loads(path.read_text())
    except OSError as e:
        raise ConfigError(
            f"cannot read DeepSpeed config {path}: {e.strerror}; pass an existing file with --deepspeed_config"
        ) from None
    except json.JSONDecodeError as e:
        raise ConfigError(f"DeepSpeed config {path} is not valid JSON (line {e.lineno}: {e.msg})") from None
    if not isinstance(config, dict):
        raise ConfigError(f"DeepSpeed config {path} must be a JSON object")
    check_types(config, path)
    scheduler_params = config.get("scheduler", {}).get("params", {})
    for key in ("total_num_steps", "warmup_max_steps"):  # names used by DeepSpeed's schedules
        if scheduler_params.get(key) == "auto":
            scheduler_params[key] = train_steps
    # DeepSpeed clips at 1.0 when the key is absent; make the value visible in the resolved config.
    config.setdefault("gradient_clipping", 1.0)
    check_optimizer_and_scheduler(config, path)
    if config.get("bf16", {}).get("enabled") and config.get("fp16", {}).get("enabled"):
        raise ConfigError("DeepSpeed config enables both bf16 and fp16; enable one")
    check_with_deepspeed(config, path)  # every other key, by DeepSpeed's own config classes
    check_parameter_values(config, path)  # the optimizer's and schedule's values, by building them
    return config


SECTIONS = ("optimizer", "scheduler", "zero_optimization", "bf16", "fp16", "data_types", "checkpoint", "pipeline")
COUNTS = ("train_batch_size", "train_micro_batch_size_per_gpu", "gradient_accumulation_steps")


def check_types(config: dict, path: Path) -> None:
    """The values we and DeepSpeed read before its own validation: objects where objects belong, whole numbers
    for the batch sizes and the ZeRO stage (a string "8" would fail deep inside as a TypeError)."""
    for key in SECTIONS:
        if key in config and not isinstance(config[key], dict):
            raise ConfigError(
                f'DeepSpeed config {path}: "{key}" must be an object, e.g. "{key}": {{...}}, '
                f"not {json.dumps(config[key])}"
            )
    stage = config.get("zero_optimization", {}).get("stage", 0)
    for key, value in [*((k, config[k]) for k in COUNTS if k in config), ("zero_optimization.stage", stage)]:
        if not isinstance(value, int) or isinstance(value, bool):
            raise ConfigError(f'DeepSpeed config {path}: "{key}" must be a whole number, not {json.dumps(value)}')
    if "gradient_clipping" in config and not isinstance(config["gradient_clipping"], int | float):
        raise ConfigError(f'DeepSpeed config {path}: "gradient_clipping" must be a number')


def check_optimizer_and_scheduler(config: dict, path: Path) -> None:
    """Names DeepSpeed 0.19.8 resolves only inside `deepspeed.initialize` (a traceback on every rank): its own
    optimizers (case-insensitive), the 1-bit ones, or a `torch.optim` class; its LR schedules."""
    import torch
    from deepspeed.runtime.config import DEEPSPEED_OPTIMIZERS
    from deepspeed.runtime.lr_schedules import VALID_LR_SCHEDULES

    optimizer = config.get("optimizer", {}).get("type")
    known = {*DEEPSPEED_OPTIMIZERS, "onebitadam", "zerooneadam", "onebitlamb"}
    if optimizer is not None and optimizer.lower() not in known and not hasattr(torch.optim, str(optimizer)):
        raise ConfigError(
            f"DeepSpeed config {path}: unknown optimizer type {optimizer!r}; use one of "
            f"{', '.join(sorted(known))} or a torch.optim class name"
        )
    scheduler = config.get("scheduler", {}).get("type")
    if scheduler is not None and scheduler not in VALID_LR_SCHEDULES:
        raise ConfigError(
            f"DeepSpeed config {path}: unknown scheduler type {scheduler!r}; use one of {', '.join(VALID_LR_SCHEDULES)}"
        )


@dataclass(frozen=True)
class BatchLayout:
    """How one optimizer step's sequences are cut: global_batch = micro_batch_size x num_micro_batches x replicas."""

    global_batch: int  # sequences per optimizer step, over all data-parallel replicas (train_batch_size)
    micro_batch_size: int  # sequences per micro-batch (train_micro_batch_size_per_gpu)
    num_micro_batches: int  # micro-batches per step and replica (gradient_accumulation_steps)


def batch_layout(config: dict, data_parallel_size: int) -> BatchLayout:
    """The batch layout, checked the way DeepSpeed multiplies its three numbers."""
    train_batch = config.get("train_batch_size")
    micro_batch_size = config.get("train_micro_batch_size_per_gpu")
    accumulation = config.get("gradient_accumulation_steps")
    if micro_batch_size is None:
        raise ConfigError("DeepSpeed config must set train_micro_batch_size_per_gpu (the pipeline's micro-batch size)")
    if train_batch is None and accumulation is None:
        raise ConfigError("DeepSpeed config must set train_batch_size or gradient_accumulation_steps")
    if accumulation is None:
        if train_batch % (micro_batch_size * data_parallel_size):
            raise ConfigError(
                f"train_batch_size {train_batch} is not divisible by train_micro_batch_size_per_gpu "
                f"{micro_batch_size} x {data_parallel_size} data-parallel replicas; change one of them in the "
                "DeepSpeed config"
            )
        accumulation = train_batch // (micro_batch_size * data_parallel_size)
    elif train_batch is None:
        train_batch = micro_batch_size * accumulation * data_parallel_size
    elif train_batch != micro_batch_size * accumulation * data_parallel_size:
        raise ConfigError(
            f"train_batch_size {train_batch} != train_micro_batch_size_per_gpu {micro_batch_size} x "
            f"gradient_accumulation_steps {accumulation} x {data_parallel_size} data-parallel replicas; fix the "
            "DeepSpeed config"
        )
    if min(train_batch, micro_batch_size, accumulation) < 1:
        raise ConfigError("batch sizes in the DeepSpeed config must be positive")
    return BatchLayout(train_batch, micro_batch_size, accumulation)


def zero_stage(config: dict) -> int:
    return config.get("zero_optimization", {}).get("stage", 0)


def check_layout(
    config: dict,
    world_size: int,
    pipeline_stages: int,
    num_layers: int,
    schedule: str = "1f1b",
    tensor_parallel: int = 1,
) -> BatchLayout:
    """Check parallel layout and schedule against the config; returns the batch layout."""
    for flag, value in (("--pipeline-stages", pipeline_stages), ("--tensor-parallel", tensor_parallel)):
        if value < 1:
            raise ConfigError(f"{flag} must be at least 1")
    replica = pipeline_stages * tensor_parallel
    if world_size % replica:
        raise ConfigError(
            f"world size {world_size} is not divisible by --pipeline-stages {pipeline_stages}"
            + (f" x --tensor-parallel {tensor_parallel}" if tensor_parallel > 1 else "")
            + f"; launch a multiple of {replica} ranks"
        )
    if pipeline_stages > num_layers:
        raise ConfigError(f"--pipeline-stages {pipeline_stages} is more than the model's {num_layers} decoder layers")
    if zero_stage(config) >= 2 and pipeline_stages > 1:
        raise ConfigError(
            f"ZeRO stage {zero_stage(config)} is incompatible with pipeline parallelism in DeepSpeed; "
            'set "zero_optimization": {"stage": 1} (or 0)'
        )
    if zero_stage(config) >= 2 and tensor_parallel > 1:  # gradients partitioned over cut layers: never tested
        raise ConfigError(
            f'ZeRO stage {zero_stage(config)} does not run with --tensor-parallel yet; set "zero_optimization": '
            '{"stage": 1}'
        )
    if config.get("wall_clock_breakdown") and pipeline_stages > 1:
        raise ConfigError("wall_clock_breakdown crashes DeepSpeed 0.19.8 with more than one stage; set it to false")
    layout = batch_layout(config, world_size // replica)
    if schedule == "dualpipev":
        check_dualpipev(config, pipeline_stages, num_layers, layout.num_micro_batches)
    if zero_stage(config) == 0 and replica > 1 and config.get("gradient_clipping", 1.0) > 0:
        # runtime/utils.py clip_grad_norm_ (called by the engine for fp32 without ZeRO) counts a parameter only on
        # model-parallel rank 0, which in the pipeline grid is the stage index: the "global" norm is stage 0's.
        alone = (
            "pipeline stage clips by the gradient norm of stage 0"
            if pipeline_stages > 1
            else ("tensor-parallel rank clips by the gradient norm of slice rank 0")
        )
        raise ConfigError(
            f"ZeRO stage 0 with more than one {alone} alone in DeepSpeed 0.19.8 (silently wrong updates): set "
            '"zero_optimization": {"stage": 1}, or "gradient_clipping": 0'
        )
    return layout


def check_dualpipev(config: dict, ranks: int, num_layers: int, micro_batches: int) -> None:
    """What DeepSpeed 0.19.8's DualPipeV cannot run (its asserts in runtime/pipe/dualpipev.py), before any rank
    starts."""
    if ranks < 2:
        raise ConfigError(
            "--schedule dualpipev needs --pipeline-stages 2 or more (one rank has no bubble to fill); use 1f1b"
        )
    if 2 * ranks > num_layers:
        raise ConfigError(
            f"--schedule dualpipev cuts the model into 2 x {ranks} = {2 * ranks} stages, more than its {num_layers} "
            "decoder layers: use fewer --pipeline-stages, or --schedule 1f1b"
        )
    if micro_batches < 2 * ranks:
        raise ConfigError(
            f"--schedule dualpipev needs at least 2 x {ranks} = {2 * ranks} micro-batches per step, the DeepSpeed "
            f"config gives {micro_batches}: raise gradient_accumulation_steps (train_batch_size) to {2 * ranks}, or "
            "use --schedule 1f1b"
        )
    if config.get("pipeline", {}).get("dynamic_shape"):
        raise ConfigError(
            '--schedule dualpipev exchanges activation shapes once: set "pipeline": {"dynamic_shape": false}, '
            "or use --schedule 1f1b"
        )
