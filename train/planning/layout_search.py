"""The layouts `python -m train.plan` plans: `--pipeline-stages` x `--tensor-parallel` as given, or with
`--search-stages` every tensor-parallel size that divides a node's GPUs and cuts the model (TP within a node, its
groups being consecutive ranks), each with the fewest pipeline stages that fit (PP across the nodes), and of those
the one that fits with the best step time (train/planning/step_time.py: compute stretched by the bubble, plus the
collectives)."""

import math
from dataclasses import dataclass

from transformers import PretrainedConfig

from models.architecture import Architecture
from models.lora import AdapterPlan
from models.quantize import Quantization
from train.config.args import Flags
from train.config.ds_config import batch_layout, check_dualpipev
from train.config.tensor_parallel import check_tensor_parallel_run
from train.errors import ConfigError
from train.planning.machine import ranks_per_node
from train.planning.memory_model import StagePlan, fits, plan_stages
from train.planning.step_time import StepTime, step_time


@dataclass(frozen=True)
class Setup:
    """What every layout of one plan shares."""

    arch: Architecture
    ds_config: dict
    adapters: AdapterPlan | None
    quantization: Quantization | None
    gpu: str
    rank_bytes: float
    world: int


@dataclass(frozen=True)
class Layout:
    tensor_parallel: int
    stages: int
    plans: list[StagePlan]
    fits: bool
    time: StepTime

    @property
    def rank(self) -> tuple:
        """Sort key: fitting ones by their step time (without a peak FLOP/s: the smaller bubble, then the
        collectives), then the others by their largest peak."""
        if not self.fits:
            return (1, max(p.peak for p in self.plans))
        seconds = self.time.layout_seconds
        return (0, seconds if not math.isnan(seconds) else (self.time.bubble, self.time.collectives))


def check_batch_divides(ds_config: dict, flags: Flags, world: int, stages: int, tp: int) -> None:
    """The DeepSpeed JSON's batch for this world, `stages` and `tp`, or one line naming the flags that change them."""
    replicas = world // (stages * tp)
    cluster = f"{world} ranks ({flags.nodes} x {ranks_per_node(flags)})"
    if world % (stages * tp):
        raise ConfigError(
            f"{cluster} do not divide into {stages} stages x tensor-parallel {tp}: plan another layout "
            "(--pipeline-stages, --tensor-parallel, --gpus-per-node, --nodes) or --search-stages"
        )
    try:
        batch_layout(ds_config, replicas)
    except ConfigError as e:
        raise ConfigError(
            f"{e}; or plan another layout: {cluster} / ({stages} stages x tensor-parallel {tp}) = {replicas} "
            "replicas: --gpus-per-node, --nodes, --pipeline-stages or --tensor-parallel"
        ) from None


def divides_batch(ds_config: dict, data_parallel: int) -> bool:
    """Whether the DeepSpeed config's batch splits over `data_parallel` replicas (a layout --search-stages may try)."""
    try:
        batch_layout(ds_config, data_parallel)
    except ConfigError:
        return False
    return True


def tensor_parallel_sizes(flags: Flags, model_config: PretrainedConfig) -> tuple[list[int], dict[int, str]]:
    """The tensor-parallel sizes to plan, and why the other divisors of a node's GPUs are not tried: `--search-stages`
    tries every divisor the model and the flags allow; otherwise `--tensor-parallel`, refused in one line as the
    trainer refuses it."""
    if not flags.search_stages:
        check_tensor_parallel_run(flags, model_config)
        return [flags.tensor_parallel], {}
    sizes, refused = [], {}
    for tp in (d for d in range(1, ranks_per_node(flags) + 1) if ranks_per_node(flags) % d == 0):
        try:
            check_tensor_parallel_run(flags, model_config, tp)
            sizes.append(tp)
        except ConfigError as e:
            refused[tp] = str(e)
    return sizes, refused


def stage_plans(flags: Flags, setup: Setup, stages: int, tp: int, method: str) -> list[StagePlan]:
    try:
        return plan_stages(
            setup.arch,
            setup.ds_config,
            stages=stages,
            data_parallel=setup.world // (stages * tp),
            seq_len=flags.seq_len,
            method=method,
            checkpoint_interval=flags.activation_checkpoint_interval,
            adapters=setup.adapters,
            quantization=setup.quantization,
            schedule=flags.schedule,
            tensor_parallel=tp,
        )
    except ValueError as e:
        raise ConfigError(str(e)) from None


def fewest_stages(flags: Flags, setup: Setup, tp: int) -> Layout:
    """`--pipeline-stages` at `tp`, or with `--search-stages` the fewest stages that fit (else the most tried)."""
    layers, ds_config = setup.arch.num_layers, setup.ds_config
    candidates = (
        [
            s
            for s in range(1, layers + 1)
            if setup.world % (s * tp) == 0 and divides_batch(ds_config, setup.world // (s * tp))
        ]
        if flags.search_stages
        else [flags.pipeline_stages]
    )
    if flags.schedule == "dualpipev":
        candidates = [s for s in candidates if 2 <= s <= layers // 2] or candidates
    if not candidates:
        raise ConfigError(f"no pipeline stages divide {setup.world} ranks / TP {tp} with this batch")
    for stages in candidates:
        check_batch_divides(ds_config, flags, setup.world, stages, tp)
        if flags.schedule == "dualpipev":
            micro = batch_layout(ds_config, setup.world // (stages * tp)).num_micro_batches
            check_dualpipev(ds_config, stages, layers, micro)
        plans = stage_plans(flags, setup, stages, tp, flags.partition_method)
        if fits(plans, setup.rank_bytes):
            break
    time = step_time(
        setup.arch,
        ds_config,
        plans,
        gpu=setup.gpu,
        world=setup.world,
        tensor_parallel=tp,
        seq_len=flags.seq_len,
        mfu=flags.mfu,
        schedule=flags.schedule,
    )
    return Layout(tp, stages, plans, fits(plans, setup.rank_bytes), time)


def _seconds(time: StepTime) -> str:
    return f"{time.layout_seconds:.3g} s" if not math.isnan(time.layout_seconds) else "no peak FLOP/s"


def search_lines(layouts: list[Layout], chosen: Layout, refused: dict[int, str]) -> list[str]:
    """What `--search-stages` tried, and why it chose what it chose."""
    time = chosen.time
    lines = [
        f"search: TP {chosen.tensor_parallel} x PP {chosen.stages}: "
        + ("fits" if chosen.fits else "nothing fits; this one's largest peak is the smallest")
        + f", {_seconds(time)} per step with the bubble ({time.bubble:.1%}) and the collectives "
        f"({time.collectives:.3g} s)" + ("; the others:" if len(layouts) > 1 or refused else "")
    ]
    for layout in layouts:
        if layout is not chosen:
            largest = max(p.peak for p in layout.plans) / 2**30
            lines.append(
                f"  TP {layout.tensor_parallel} x PP {layout.stages}: "
                + (
                    f"{_seconds(layout.time)}, bubble {layout.time.bubble:.1%}"
                    if layout.fits
                    else f"does not fit ({largest:.1f} GiB)"
                )
            )
    lines += [f"  TP {tp}: {why}" for tp, why in refused.items()]
    return lines
