"""Plan a run before renting the cluster: partition, memory per GPU, bubble, step time.

    python -m train.plan --model-config gpt2-xl --nodes 4 --gpus-per-node 8 --gpu H100 \
        --deepspeed_config ds_configs/gpu_bf16.json --seq-len 1024 \
        [--pipeline-stages 4 --tensor-parallel 2 | --search-stages] [--data-format preference]

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
from train.config.ds_config import load_ds_config
from train.config.run_config import model_config_from_flags
from train.errors import entry_point
from train.planning.layout_search import Setup, fewest_stages, search_lines, stage_plans, tensor_parallel_sizes
from train.planning.machine import GPU_MEMORY_GIB, LAUNCH_CPU_RANKS, plan_device, ranks_per_node
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
        help="plan the layout instead of --pipeline-stages and --tensor-parallel: per tensor-parallel size that "
        "divides --gpus-per-node and cuts the model, the fewest stages that fit; of those the fastest that fits",
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


def make_plan(flags: Flags) -> Plan:
    """The plan for `--pipeline-stages` x `--tensor-parallel` (or, with `--search-stages`, per tensor-parallel size
    that divides a node and cuts the model, the fewest stages that fit; of those layouts the fastest that fits)."""
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
    sizes, refused = tensor_parallel_sizes(flags, model_config)
    setup = Setup(arch, ds_config, adapters, quantization, gpu, rank_bytes, world)
    layouts = [fewest_stages(flags, setup, tp) for tp in sizes]
    chosen = min(layouts, key=lambda layout: layout.rank)
    other = OTHER_BALANCE.get(flags.partition_method.lower()) if routed_fraction(arch)[1] > 1 else None
    other = other if chosen.stages > 1 else None
    return Plan(
        arch,
        ds_config,
        gpu=gpu,
        rank_bytes=rank_bytes,
        world_size=world,
        stages=chosen.stages,
        plans=chosen.plans,
        adapters=adapters,
        other=(other, stage_plans(flags, setup, chosen.stages, chosen.tensor_parallel, other)) if other else None,
        tensor_parallel=chosen.tensor_parallel,
        time=chosen.time,
        search=search_lines(layouts, chosen, refused) if flags.search_stages else [],
    )


OTHER_BALANCE = {"flops": "parameters", "parameters": "flops"}


def main(argv: list[str] | None = None) -> int:
    flags = parse_args(argv, build_parser())
    return entry_point(lambda: print_plan(make_plan(flags), flags))


if __name__ == "__main__":
    sys.exit(main())
