"""The planner's step time: the step's model FLOPs at an assumed MFU, the tensor-parallel collectives on top (they
block the layer's next matmul, as Megatron's do), and, to compare layouts (`--search-stages`), the pipeline bubble.

Compute: the model's FLOPs per step spread over every rank at `mfu` of the GPU's peak; with tensor parallelism t the
embedding's and head's FLOPs are done by each of the t ranks of a slice group (they are replicated), so t - 1 more
copies of the head's. Collectives: the busiest pipeline rank's, per micro-batch its decoder layers' traffic
(train/planning/tensor_parallel.py) at the training width, times the micro-batches, at the node's bus bandwidth
(train/planning/machine.py: INTRA_NODE_BUS_GBPS, an assumption per GPU model).
"""

from dataclasses import dataclass

from models.architecture import Architecture
from models.flops import flops_per_token, head_flops_per_token
from train.config.ds_config import batch_layout
from train.observe.mfu import PEAK_TFLOPS, training_dtype
from train.planning.machine import bus_bandwidth
from train.planning.memory_model import StagePlan
from train.planning.schedules import bubble_theory
from train.planning.tensor_parallel import collective_seconds, layer_traffic


@dataclass(frozen=True)
class StepTime:
    flops: float  # model FLOPs per step (MFU's numerator: the replicated head once)
    compute: float  # seconds at the MFU (nan without a peak FLOP/s for the GPU and dtype)
    all_reduce_bytes: float  # the busiest pipeline rank's tensor-parallel all-reduces per step
    all_gather_bytes: float  # and its all-gathers (gathered bytes)
    collectives: float  # their seconds
    bubble: float  # the schedule's idle share

    @property
    def seconds(self) -> float:
        """What the plan prints: compute at the MFU plus the collectives."""
        return self.compute + self.collectives

    @property
    def layout_seconds(self) -> float:
        """What `--search-stages` compares layouts by: compute stretched by the bubble (the MFU taken as the
        busy ranks' efficiency), plus the collectives."""
        return self.compute / (1 - self.bubble) + self.collectives


def step_time(
    arch: Architecture,
    ds_config: dict,
    plans: list[StagePlan],
    *,
    gpu: str,
    world: int,
    tensor_parallel: int,
    seq_len: int,
    mfu: float,
    schedule: str,
) -> StepTime:
    """The step time of a plan of `len(plans)` pipeline ranks (module docstring)."""
    stages, dtype = len(plans), training_dtype(ds_config)
    batch = batch_layout(ds_config, world // (stages * tensor_parallel))
    tokens = batch.global_batch * seq_len
    flops = flops_per_token(arch, seq_len) * tokens
    done = flops + (tensor_parallel - 1) * head_flops_per_token(arch) * tokens
    peak = next((v for k, v in PEAK_TFLOPS if k.upper() == gpu), {}).get(dtype, 0)
    compute = done / (world * peak * 1e12 * mfu) if peak else float("nan")
    traffic, width = layer_traffic(arch, tensor_parallel), 4 if dtype == "fp32" else 2
    per_token = [
        [sum(getattr(traffic[i], kind) for start, stop in p.bounds for i in range(start, stop)) for p in plans]
        for kind in ("all_reduce", "all_gather")
    ]
    micro_tokens = batch.micro_batch_size * seq_len * batch.num_micro_batches * width
    busiest = max(range(stages), key=lambda r: 2 * per_token[0][r] + per_token[1][r])
    reduced, gathered = (micro_tokens * kind[busiest] for kind in per_token)
    return StepTime(
        flops=flops,
        compute=compute,
        all_reduce_bytes=reduced,
        all_gather_bytes=gathered,
        collectives=collective_seconds(reduced, gathered, tensor_parallel, bus_bandwidth(gpu)),
        bubble=bubble_theory(schedule, stages, batch.num_micro_batches),
    )
