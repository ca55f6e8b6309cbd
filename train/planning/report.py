"""What `python -m train.plan` prints, and the plan it prints: the header, the LoRA line, what `--search-stages`
tried, the memory table per stage, the balance of a mixture of experts' two partitions, the bubble and step time,
tensor parallelism's collectives, preference training's reference pass (train/planning/reference_pass.py), and the
warnings."""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field

from models.architecture import Architecture, ranges_text
from models.flops import active_parameters, routed_fraction
from models.lora import AdapterPlan
from models.quantize import expert_weights
from train.config.args import Flags
from train.config.ds_config import batch_layout
from train.observe.mfu import training_dtype
from train.planning.machine import GPU_MEMORY_GIB, bus_bandwidth, machine_memory, machine_ranks
from train.planning.memory_model import StagePlan, fits
from train.planning.reference_pass import plan_reference_pass, reference_lines
from train.planning.schedules import SCHEDULE_NAMES
from train.planning.step_time import StepTime

# What the memory table cannot know, said under it. Measured against it (CPU fp32, ZeRO-1, glibc's mmap threshold
# pinned): qwen2.5-0.5b at its own 151,936-token vocabulary on 2 ranks, planned / measured 0.99 and 0.99
# (bench/memory_bench.py); a SmolLM2-135M-class model imported with --model, full and LoRA, on 1 and 2 ranks,
# 0.96-1.00 (bench/imported_memory_bench.py, docs/performance.md).
NOT_COUNTED = (
    "not counted: what the allocator keeps after freeing it (CUDA's caching allocator: torch.cuda.memory_reserved "
    "beyond memory_allocated, fragmentation; PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True reduces it; on CPU "
    "glibc's arenas), the CUDA context and NCCL's buffers (about 0.5-1 GiB per GPU), and the data path's own memory"
)


@dataclass
class Plan:
    arch: Architecture
    ds_config: dict
    gpu: str  # a GPU of GPU_MEMORY_GIB, or "CPU" (this machine's CPU ranks)
    rank_bytes: float  # what each rank may hold: the GPU's memory, or a CPU rank's share of this machine's
    world_size: int
    stages: int
    plans: list[StagePlan]
    time: StepTime
    adapters: AdapterPlan | None = None
    other: tuple[str, list[StagePlan]] | None = None  # a mixture of experts: the other balance, for comparison
    tensor_parallel: int = 1
    search: list[str] = field(default_factory=list)  # --search-stages: what it tried and why it chose this

    @property
    def data_parallel(self) -> int:
        return self.world_size // (self.stages * self.tensor_parallel)


# With experts, FLOPs and memory pull apart (models/flops.py: flops_partition); the plan shows the other balance.


def balance_line(plan: Plan) -> str:
    """How the two balances compare: the slowest stage's share of the FLOPs and the largest peak under each."""

    def summary(plans: list[StagePlan]) -> str:
        total = sum(p.flops for p in plans)
        return f"slowest stage {max(p.flops for p in plans) / total:.1%} of the FLOPs, largest peak " + (
            f"{max(p.peak for p in plans) / 2**30:.1f} GiB"
        )

    method, others = plan.other
    return f"balance: this partition: {summary(plan.plans)}; partition {method}: {summary(others)}"


def lora_summary(plan: Plan, flags: Flags) -> str:
    """The plan's LoRA line: what is adapted and trains; under QLoRA what stays at the training width (the experts)."""
    adapters, arch = plan.adapters, plan.arch
    trainable = sum(p.trainable for p in plan.plans)
    experts = expert_weights(arch.meta_model())
    return (
        f"LoRA: rank {adapters.config.r} on {len(adapters.targets)} modules"
        + (f" and {len(adapters.parameters)} fused expert weights" if adapters.parameters else "")
        + f", {trainable / 1e6:,.1f}M trainable parameters ({trainable / arch.parameters():.2%}); the base is "
        "frozen: no gradients or optimizer states for it"
        + ("; its decoder's linear layers in 4 bits (QLoRA)" if flags.load_in_4bit else "")
        + (
            f", its experts' fused weights ({experts / 1e9:.2f}B) in {training_dtype(plan.ds_config)}"
            if flags.load_in_4bit and experts
            else ""
        )
    )


def print_plan(plan: Plan, flags: Flags) -> None:
    arch, ds_config, stages, time = plan.arch, plan.ds_config, plan.stages, plan.time
    bubble, flops_step, step_time = time.bubble, time.flops, time.seconds
    print(
        f"{flags.model_config or flags.model} ({arch.config.model_type}): {arch.num_layers} layers, "
        f"d={arch.hidden_size}, vocab {arch.config.vocab_size}, {arch.parameters() / 1e9:.2f}B parameters"
        f"{experts_text(arch)}, seq {flags.seq_len}; {flags.nodes} x {plan.world_size // flags.nodes} "
        f"{device_text(plan)}, {training_dtype(ds_config)}"
    )
    if plan.adapters is not None:
        print(lora_summary(plan, flags))
    if flags.gpus_per_node is None:
        print(f"planning for this machine: {machine_ranks()[1]}; --gpus-per-node and --nodes plan another")
    if plan.search:
        print("\n".join(plan.search))
    print(layout_line(plan, flags))
    print_memory_table(plan.plans)
    if plan.other is not None:
        print(balance_line(plan))
    print(NOT_COUNTED)
    theory = (
        "(p-1)/(m+p-1)"
        if flags.schedule == "1f1b"
        else "from DeepSpeed's DualPipeV instructions, backward = 2 forwards"
    )
    time_text = (
        f"step time at {flags.mfu:.0%} MFU: {step_time:.2f} s"
        if not math.isnan(step_time)
        else "no step time (no peak FLOP/s)"
    )
    print(f"bubble {theory} = {bubble:.1%}; {flops_step / 1e15:,.2f} PFLOP per step; {time_text}")
    if plan.tensor_parallel > 1:
        print(collectives_line(plan))
    if flags.data_format == "preference":
        print_reference_pass(plan, flags, flops_step, step_time)
    print_warnings(plan)
    print(
        json.dumps(
            {
                "stages": stages,
                "tensor_parallel": plan.tensor_parallel,
                "schedule": flags.schedule,
                "data_parallel": plan.data_parallel,
                "rank_layer_bounds": [[list(b) for b in p.bounds] for p in plan.plans],
                "bubble": bubble,
                "stage_parameters": [p.parameters for p in plan.plans],
                "stage_trainable_parameters": [p.trainable for p in plan.plans],
                "stage_peak_gib": [p.peak / 2**30 for p in plan.plans],
                "stage_gflops_per_token": [p.flops / 1e9 for p in plan.plans],
                "tensor_parallel_gib_per_step": (time.all_reduce_bytes + time.all_gather_bytes) / 2**30,
                "tensor_parallel_seconds": time.collectives,
            }
        )
    )


def print_reference_pass(plan: Plan, flags: Flags, flops_step: float, step_time: float) -> None:
    """Preference data: the reference pass's time and memory, from the step's FLOPs and time."""
    ref = plan_reference_pass(
        plan.arch,
        plan.ds_config,
        plan.plans,
        data_parallel=plan.data_parallel,
        seq_len=flags.seq_len,
        train_steps=flags.train_steps,
        flops_step=flops_step,
        step_time=step_time,
    )
    print("\n".join(reference_lines(ref, flags.train_steps, flags.mfu, lora=plan.adapters is not None)))


def device_text(plan: Plan) -> str:
    """ "H100 (80 GiB)", or for this machine's CPU ranks "CPU ranks (62.7 GiB each: this machine's 125.4 GiB / 2)"."""
    if plan.gpu != "CPU":
        return f"{plan.gpu} ({GPU_MEMORY_GIB[plan.gpu]} GiB)"
    total = machine_memory()
    return (
        f"CPU ranks ({plan.rank_bytes / 2**30:.1f} GiB each: this machine's {total / 2**30:.1f} GiB / "
        f"{round(total / plan.rank_bytes)})"
    )


def experts_text(arch: Architecture) -> str:
    """ ", 3.35B active per token (8 of 128 experts)" for a mixture of experts; "" for a dense model."""
    top_k, experts = routed_fraction(arch)
    return (
        f", {active_parameters(arch) / 1e9:.2f}B active per token ({top_k} of {experts} experts)" if experts > 1 else ""
    )


def print_warnings(plan: Plan) -> None:
    gpu, stages, batch = plan.gpu, plan.stages, batch_layout(plan.ds_config, plan.data_parallel)
    if not fits(plan.plans, plan.rank_bytes):
        print(
            f"warning: a stage needs more than 90% of the {plan.rank_bytes / 2**30:.1f} GiB of a {gpu} rank: more "
            "stages or tensor parallelism, activation checkpointing or a smaller micro-batch"
        )
    if stages > 1 and batch.num_micro_batches < 4 * stages:
        print(
            f"warning: {batch.num_micro_batches} micro-batches < 4 x {stages} stages: the bubble is large; raise "
            "gradient_accumulation_steps (train_batch_size) in the DeepSpeed config"
        )


def collectives_line(plan: Plan) -> str:
    """Tensor parallelism's communication per step on the busiest pipeline rank, and its time."""
    time, gpu = plan.time, plan.gpu
    gathers = f" and all-gathers of {time.all_gather_bytes / 2**30:,.2f} GiB" if time.all_gather_bytes else ""
    where = f"{gpu} NVLink/intra-node" if gpu != "CPU" else "CPU ranks (loopback)"
    return (
        f"tensor parallel {plan.tensor_parallel}: per step, the busiest rank all-reduces "
        f"{time.all_reduce_bytes / 2**30:,.2f} GiB{gathers} in its slice group: {time.collectives:.2f} s at "
        f"{bus_bandwidth(gpu) / 1e9:,.0f} GB/s bus bandwidth ({where}, assumed: train/planning/machine.py), "
        "counted in the step time"
    )


def layout_line(plan: Plan, flags: Flags) -> str:
    stages, batch = plan.stages, batch_layout(plan.ds_config, plan.data_parallel)
    tp = f"tensor parallel {plan.tensor_parallel} x " if plan.tensor_parallel > 1 else ""
    return (
        f"layout: {tp}{stages} pipeline stages x {plan.data_parallel} data-parallel replicas, "
        f"{batch.num_micro_batches} micro-batches of {batch.micro_batch_size} (global batch {batch.global_batch}), "
        f"partition {flags.partition_method}, {SCHEDULE_NAMES[flags.schedule]} schedule"
        + (f" (two stages per rank, {2 * stages} in all)" if flags.schedule == "dualpipev" else "")
    )


def print_memory_table(plans: list[StagePlan]) -> None:
    """One row per pipeline rank; under DualPipeV the layers of both its stages."""
    print(
        "| stage | layers | parameters | trainable | GFLOP/token (share) | weights GiB | optimizer GiB "
        "| gradients GiB (backward / step) | activations GiB (backward / step) | peak GiB |"
    )
    print("| ---: | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
    total_flops = sum(plan.flops for plan in plans)
    for plan in plans:
        m = {k: v / 2**30 for k, v in plan.memory.items()}
        layers = f"{ranges_text(plan.bounds)}: {plan.layers[0]} .. {plan.layers[-1]}"
        layers += f" ({len(plan.layers)})"
        print(
            f"| {plan.stage} | {layers} | {plan.parameters / 1e6:,.1f}M | {plan.trainable / 1e6:,.1f}M | "
            f"{plan.flops / 1e9:,.2f} ({plan.flops / total_flops:.0%}) | {m['weights']:.2f} | {m['optimizer']:.2f} | "
            f"{m['reduction'] + m['backward_gradients']:.2f} / {m['reduction'] + m['step_gradients']:.2f} | "
            f"{m['activations']:.2f} / {m['kept_logits']:.2f} | {plan.peak / 2**30:.2f} |"
        )
