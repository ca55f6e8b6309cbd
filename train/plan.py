"""Plan a run before renting the cluster: partition, memory per GPU, bubble, step time.

    python -m train.plan --model-config gpt2-xl --nodes 4 --gpus-per-node 8 --gpu H100 \
        --deepspeed_config ds_configs/gpu_bf16.json --seq-len 1024 [--pipeline-stages 4 | --search-stages]

The model and layout flags are the trainer's, with the trainer's defaults.

The partition is the one DeepSpeed will make (the same solver on the same per-layer weights); the memory
per stage comes from `train/planning/memory_model.py`, checked against measured memory in `bench/memory_bench.py`
and the tests.
"""

import argparse
import json
import sys
from dataclasses import dataclass

from models.architecture import Architecture, discover
from models.flops import flops_per_token
from models.lora import AdapterPlan
from models.pipeline import ranges_text
from models.quantize import Quantization
from train.config.adapters import adapters_from_flags
from train.config.args import DefaultsShown, Flags, OneLineErrors, parse_args, shared_flags
from train.config.ds_config import batch_layout, check_dualpipev, load_ds_config
from train.config.run_config import model_config_from_flags
from train.errors import ConfigError, entry_point
from train.observe.mfu import PEAK_TFLOPS, training_dtype
from train.planning.memory_model import StagePlan, fits, plan_stages
from train.planning.schedules import SCHEDULE_NAMES, bubble_theory

GPU_MEMORY_GIB = {
    "H200": 141,
    "H100": 80,
    "A100": 80,
    "A100-40GB": 40,
    "L40S": 48,
    "A10G": 24,
    "V100": 32,
    "MI300X": 192,
    "MI250X": 128,
}


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
    cluster.add_argument("--gpu", default="H100", help=f"one of {', '.join(GPU_MEMORY_GIB)}")
    cluster.add_argument(
        "--search-stages",
        action="store_true",
        help="plan the fewest pipeline stages that fit instead of --pipeline-stages",
    )
    cluster.add_argument("--mfu", type=float, default=0.4, help="assumed model FLOPs utilisation for the step time")
    return p


# launch.sh's ranks on a machine without a GPU (its `NUM_GPUS=${NUM_GPUS:-2}`; tests/unit/test_plan.py reads it there).
LAUNCH_CPU_RANKS = 2


def machine_ranks() -> tuple[int, str]:
    """The ranks launch.sh starts on this machine, and what they are: NUM_GPUS when set, else every GPU, else
    LAUNCH_CPU_RANKS CPU ranks (also with DS_ACCELERATOR=cpu)."""
    import os

    import torch

    gpus = torch.cuda.device_count() if os.environ.get("DS_ACCELERATOR") != "cpu" else 0
    if os.environ.get("NUM_GPUS", "").isdigit() and int(os.environ["NUM_GPUS"]) > 0:
        ranks = int(os.environ["NUM_GPUS"])
        return ranks, f"{ranks} {'GPU' if gpus else 'CPU'} ranks (NUM_GPUS)"
    if gpus:
        return gpus, f"its {gpus} GPUs"
    return LAUNCH_CPU_RANKS, f"{LAUNCH_CPU_RANKS} CPU ranks (no GPU: launch.sh's default; NUM_GPUS sets another)"


def ranks_per_node(flags: Flags) -> int:
    return machine_ranks()[0] if flags.gpus_per_node is None else flags.gpus_per_node


def check_batch_divides(ds_config: dict, flags: Flags, world: int, stages: int) -> None:
    """The DeepSpeed JSON's batch for this world and these stages, or one line naming the flags that change them."""
    try:
        batch_layout(ds_config, world // stages)
    except ConfigError as e:
        raise ConfigError(
            f"{e}; or plan another layout: {world} ranks ({flags.nodes} x {ranks_per_node(flags)}) / {stages} "
            f"stages = {world // stages} replicas: --gpus-per-node, --nodes or --pipeline-stages"
        ) from None


@dataclass
class Plan:
    arch: Architecture
    ds_config: dict
    gpu: str
    world_size: int
    stages: int
    plans: list[StagePlan]
    adapters: AdapterPlan | None = None

    @property
    def data_parallel(self) -> int:
        return self.world_size // self.stages


def make_plan(flags: Flags) -> Plan:
    """The plan for `--pipeline-stages` (or, with `--search-stages`, the fewest stages that fit)."""
    model_config = model_config_from_flags(flags, flags.vocab_size)
    arch = discover(model_config)
    adapters = adapters_from_flags(flags, model_config, need_base=False)
    quantization = (
        Quantization(quant_type=flags.bnb_4bit_quant_type, double_quant=flags.bnb_4bit_double_quant)
        if flags.load_in_4bit
        else None
    )
    ds_config = load_ds_config(flags.deepspeed_config, flags.train_steps)
    gpu, world = flags.gpu.upper(), flags.nodes * ranks_per_node(flags)
    if gpu not in GPU_MEMORY_GIB:
        raise ConfigError(f"unknown --gpu {flags.gpu}: use one of {', '.join(GPU_MEMORY_GIB)}")
    candidates = (
        [s for s in range(1, arch.num_layers + 1) if world % s == 0] if flags.search_stages else [flags.pipeline_stages]
    )
    if flags.schedule == "dualpipev":
        candidates = [s for s in candidates if 2 <= s <= arch.num_layers // 2] or candidates
    for stages in candidates:
        check_batch_divides(ds_config, flags, world, stages)
        if flags.schedule == "dualpipev":
            check_dualpipev(
                ds_config, stages, arch.num_layers, batch_layout(ds_config, world // stages).num_micro_batches
            )
        try:
            plans = plan_stages(
                arch,
                ds_config,
                stages=stages,
                data_parallel=world // stages,
                seq_len=flags.seq_len,
                method=flags.partition_method,
                checkpoint_interval=flags.activation_checkpoint_interval,
                adapters=adapters,
                quantization=quantization,
                schedule=flags.schedule,
            )
        except ValueError as e:
            raise ConfigError(str(e)) from None
        if fits(plans, GPU_MEMORY_GIB[gpu] * 2**30):
            break
    return Plan(arch, ds_config, gpu=gpu, world_size=world, stages=stages, plans=plans, adapters=adapters)


# What the memory table cannot know, said under it. Measured against it (bench/memory_bench.py, CPU fp32, ZeRO-1):
# qwen2.5-0.5b at its own 151,936-token vocabulary on 2 ranks, planned / measured 0.99 and 0.96.
NOT_COUNTED = (
    "not counted: what the allocator keeps after freeing it (CUDA's caching allocator: torch.cuda.memory_reserved "
    "beyond memory_allocated, fragmentation; PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True reduces it; on CPU "
    "glibc's arenas), the CUDA context and NCCL's buffers (about 0.5-1 GiB per GPU), and the data path's own memory"
)


def print_plan(plan: Plan, flags: Flags) -> None:
    arch, ds_config, gpu, stages = plan.arch, plan.ds_config, plan.gpu, plan.stages
    batch = batch_layout(ds_config, plan.data_parallel)
    bubble = bubble_theory(flags.schedule, stages, batch.num_micro_batches)
    flops_step = flops_per_token(arch, flags.seq_len) * batch.global_batch * flags.seq_len
    peak = next((v for k, v in PEAK_TFLOPS if k.upper() == gpu), {}).get(training_dtype(ds_config), 0)
    step_time = flops_step / (plan.world_size * peak * 1e12 * flags.mfu) if peak else float("nan")
    print(
        f"{flags.model_config or flags.model} ({arch.config.model_type}): {arch.num_layers} layers, "
        f"d={arch.hidden_size}, vocab {arch.config.vocab_size}, {arch.parameters() / 1e9:.2f}B parameters, "
        f"seq {flags.seq_len}; {flags.nodes} x {plan.world_size // flags.nodes} {gpu} ({GPU_MEMORY_GIB[gpu]} GiB), "
        f"{training_dtype(ds_config)}"
    )
    if plan.adapters is not None:
        trainable = sum(p.trainable for p in plan.plans)
        print(
            f"LoRA: rank {plan.adapters.config.r} on {len(plan.adapters.targets)} modules, {trainable / 1e6:,.1f}M "
            f"trainable parameters ({trainable / arch.parameters():.2%}); the base is frozen: no gradients or "
            "optimizer states for it"
            + ("; its decoder's linear layers in 4 bits (QLoRA)" if flags.load_in_4bit else "")
        )
    if flags.gpus_per_node is None:
        print(f"planning for this machine: {machine_ranks()[1]}; --gpus-per-node and --nodes plan another")
    print(layout_line(plan, flags))
    print_memory_table(plan.plans)
    print(NOT_COUNTED)
    theory = (
        "(p-1)/(m+p-1)"
        if flags.schedule == "1f1b"
        else "from DeepSpeed's DualPipeV instructions, backward = 2 forwards"
    )
    print(
        f"bubble {theory} = {bubble:.1%}; {flops_step / 1e15:,.2f} PFLOP per step; "
        f"step time at {flags.mfu:.0%} MFU: {step_time:.2f} s"
    )
    if not fits(plan.plans, GPU_MEMORY_GIB[gpu] * 2**30):
        print(
            f"warning: a stage needs more than 90% of the {GPU_MEMORY_GIB[gpu]} GiB: more stages, activation "
            "checkpointing or a smaller micro-batch"
        )
    if stages > 1 and batch.num_micro_batches < 4 * stages:
        print(
            f"warning: {batch.num_micro_batches} micro-batches < 4 x {stages} stages: the bubble is large; raise "
            "gradient_accumulation_steps (train_batch_size) in the DeepSpeed config"
        )
    print(
        json.dumps(
            {
                "stages": stages,
                "schedule": flags.schedule,
                "data_parallel": plan.data_parallel,
                "rank_layer_bounds": [[list(b) for b in p.bounds] for p in plan.plans],
                "bubble": bubble,
                "stage_parameters": [p.parameters for p in plan.plans],
                "stage_trainable_parameters": [p.trainable for p in plan.plans],
                "stage_peak_gib": [p.peak / 2**30 for p in plan.plans],
            }
        )
    )


def layout_line(plan: Plan, flags: Flags) -> str:
    stages, batch = plan.stages, batch_layout(plan.ds_config, plan.data_parallel)
    return (
        f"layout: {stages} pipeline stages x {plan.data_parallel} data-parallel replicas, {batch.num_micro_batches} "
        f"micro-batches of {batch.micro_batch_size} (global batch {batch.global_batch}), "
        f"partition {flags.partition_method}, {SCHEDULE_NAMES[flags.schedule]} schedule"
        + (f" (two stages per rank, {2 * stages} in all)" if flags.schedule == "dualpipev" else "")
    )


def print_memory_table(plans: list[StagePlan]) -> None:
    """One row per pipeline rank; under DualPipeV the layers of both its stages."""
    print(
        "| stage | layers | parameters | trainable | weights GiB | optimizer GiB | gradients GiB (backward / step) "
        "| activations GiB | peak GiB |"
    )
    print("| ---: | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
    for plan in plans:
        m = {k: v / 2**30 for k, v in plan.memory.items()}
        layers = f"{ranges_text(plan.bounds)}: {plan.layers[0]} .. {plan.layers[-1]}"
        layers += f" ({len(plan.layers)})"
        print(
            f"| {plan.stage} | {layers} | {plan.parameters / 1e6:,.1f}M | {plan.trainable / 1e6:,.1f}M | "
            f"{m['weights']:.2f} | {m['optimizer']:.2f} | "
            f"{m['reduction'] + m['backward_gradients']:.2f} / {m['reduction'] + m['step_gradients']:.2f} | "
            f"{m['activations']:.2f} | {plan.peak / 2**30:.2f} |"
        )


def main(argv: list[str] | None = None) -> int:
    flags = parse_args(argv, build_parser())
    return entry_point(lambda: print_plan(make_plan(flags), flags))


if __name__ == "__main__":
    sys.exit(main())
