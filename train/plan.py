"""Plan a run before renting the cluster: partition, memory per GPU, bubble, step time.

    python -m train.plan --model-config gpt2-xl --nodes 4 --gpus-per-node 8 --gpu H100 \
        --deepspeed_config ds_configs/gpu_bf16.json --seq-len 1024 [--pipeline-stages 4 | --search-stages] \
        [--data-format preference]

The model and layout flags are the trainer's, with the trainer's defaults.

The partition is the one DeepSpeed will make (the same solver on the same per-layer weights); the memory
per stage comes from `train/planning/memory_model.py`, checked against measured memory in `bench/memory_bench.py`
and the tests.
"""

import argparse
import sys

from models.architecture import discover
from models.flops import routed_fraction
from models.quantize import Quantization
from train.config.adapters import adapters_from_flags
from train.config.args import DATA_FORMATS, DefaultsShown, Flags, OneLineErrors, parse_args, shared_flags
from train.config.ds_config import batch_layout, check_dualpipev, load_ds_config
from train.config.run_config import model_config_from_flags
from train.errors import ConfigError, entry_point
from train.planning.machine import GPU_MEMORY_GIB, LAUNCH_CPU_RANKS, plan_device, ranks_per_node
from train.planning.memory_model import StagePlan, fits, plan_stages
from train.planning.report import Plan, print_plan


def build_parser() -> argparse.ArgumentParser:
    p = OneLineErrors(
        prog="python -m train.plan",
        description=__doc__,
        parents=shared_flags(),
        formatter_class=DefaultsShown,
    )
    cluster = p.add_argument_group("cluster")
    cluster.add_argument("--nodes", type=int, default=1, help="nodes of the cluster")
    cluster.add_argument(
        "--gpus-per-node",
        type=int,
        default=None,
        help="GPUs (ranks) per node (default: this machine's, as launch.sh counts them: NUM_GPUS, else its GPUs, "
        f"else {LAUNCH_CPU_RANKS} CPU ranks)",
    )
    cluster.add_argument(
        "--gpu",
        default="H100",
        help=f"one of {', '.join(GPU_MEMORY_GIB)} (planning this machine's CPU ranks, each holds an equal share of "
        "its memory instead)",
    )
    cluster.add_argument(
        "--search-stages",
        action="store_true",
        help="plan the fewest pipeline stages that fit instead of --pipeline-stages",
    )
    cluster.add_argument("--mfu", type=float, default=0.4, help="assumed model FLOPs utilisation for the step time")
    run = p.add_argument_group("the run's data")
    run.add_argument(
        "--data-format",
        choices=DATA_FORMATS,
        default="text",
        help="the trainer's --data-format; preference adds the reference pass before step 1 (its time and memory, "
        "--train-steps as one epoch) under the table",
    )
    return p


def check_batch_divides(ds_config: dict, flags: Flags, world: int, stages: int) -> None:
    """The DeepSpeed JSON's batch for this world and these stages, or one line naming the flags that change them."""
    try:
        batch_layout(ds_config, world // stages)
    except ConfigError as e:
        raise ConfigError(
            f"{e}; or plan another layout: {world} ranks ({flags.nodes} x {ranks_per_node(flags)}) / {stages} "
            f"stages = {world // stages} replicas: --gpus-per-node, --nodes or --pipeline-stages"
        ) from None


def divides_batch(ds_config: dict, data_parallel: int) -> bool:
    """Whether the DeepSpeed config's batch splits over `data_parallel` replicas (a layout --search-stages may try)."""
    try:
        batch_layout(ds_config, data_parallel)
    except ConfigError:
        return False
    return True


def make_plan(flags: Flags) -> Plan:
    """The plan for `--pipeline-stages` (or, with `--search-stages`, the fewest stages that fit)."""
    if flags.tensor_parallel > 1:
        raise ConfigError(
            f"--tensor-parallel {flags.tensor_parallel}: the planner does not model cut layers yet (docs/"
            "tensor_parallel.md); plan the stages with --tensor-parallel 1, whose per-rank decoder weights TP divides"
        )
    model_config = model_config_from_flags(flags, flags.vocab_size)
    arch = discover(model_config)
    adapters = adapters_from_flags(flags, model_config, need_base=False)
    quantization = (
        Quantization(quant_type=flags.bnb_4bit_quant_type, double_quant=flags.bnb_4bit_double_quant)
        if flags.load_in_4bit
        else None
    )
    ds_config = load_ds_config(flags.deepspeed_config, flags.train_steps)
    (gpu, rank_bytes), world = plan_device(flags), flags.nodes * ranks_per_node(flags)
    candidates = (
        [s for s in range(1, arch.num_layers + 1) if world % s == 0 and divides_batch(ds_config, world // s)]
        if flags.search_stages
        else [flags.pipeline_stages]
    )
    if flags.schedule == "dualpipev":
        candidates = [s for s in candidates if 2 <= s <= arch.num_layers // 2] or candidates

    def stage_plans(stages: int, method: str) -> list[StagePlan]:
        try:
            return plan_stages(
                arch,
                ds_config,
                stages=stages,
                data_parallel=world // stages,
                seq_len=flags.seq_len,
                method=method,
                checkpoint_interval=flags.activation_checkpoint_interval,
                adapters=adapters,
                quantization=quantization,
                schedule=flags.schedule,
            )
        except ValueError as e:
            raise ConfigError(str(e)) from None

    for stages in candidates:
        check_batch_divides(ds_config, flags, world, stages)
        if flags.schedule == "dualpipev":
            check_dualpipev(
                ds_config, stages, arch.num_layers, batch_layout(ds_config, world // stages).num_micro_batches
            )
        plans = stage_plans(stages, flags.partition_method)
        if fits(plans, rank_bytes):
            break
    method = flags.partition_method.lower()
    other = OTHER_BALANCE.get(method) if routed_fraction(arch)[1] > 1 and stages > 1 else None
    return Plan(
        arch,
        ds_config,
        gpu=gpu,
        rank_bytes=rank_bytes,
        world_size=world,
        stages=stages,
        plans=plans,
        adapters=adapters,
        other=(other, stage_plans(stages, other)) if other else None,
    )


OTHER_BALANCE = {"flops": "parameters", "parameters": "flops"}


def main(argv: list[str] | None = None) -> int:
    flags = parse_args(argv, build_parser())
    return entry_point(lambda: print_plan(make_plan(flags), flags))


if __name__ == "__main__":
    sys.exit(main())
