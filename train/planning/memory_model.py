"""The planner's memory model: stage bounds as DeepSpeed makes them, and the bytes each stage holds.

Memory per GPU of pipeline rank s holding P_s parameters (one stage under 1F1B, two under DualPipeV), in
bytes, as DeepSpeed 0.19.8 allocates it
(w = 2 for bf16/fp16, 4 for fp32; g = 4 with fp32 gradient accumulation, else w; r replicas):

    weights      P_s x w
    optimizer    P_s x (4 fp32 master + 8 Adam moments) / r with ZeRO-1 (without ZeRO, 8 + 4 unless fp32)
    reduction    min(P_s, reduce_bucket_size) x g: ZeRO's contiguous gradient bucket, kept between steps
    gradients    during backward: P_s x g (param.grad, accumulated over the micro-batches);
                 in the optimizer step: P_s x 4 / r (the fp32 gradient of this rank's partition)
                 plus Adam's two fp32 temporaries of it, 8 x P_s / r (4 x P_s without ZeRO)
    activations  per block and micro-batch, the bytes autograd saves in one forward of that decoder
                 layer (counted on narrow real copies, train/planning/activations.py): per token, scaled to
                 b x s tokens (an MoE layer's experts keep their top-k rows, a dense first layer its own),
                 plus a constant per forward (LoRA on fused experts: the whole adapted expert stack W + BA,
                 [experts, out, in], which the experts' matmul keeps); with activation checkpointing only
                 each block's input, plus one block's full set (its constant once) during its
                 recomputation; on the stage with the head also b s V x (w + 4): the logits and the fp32
                 log-softmax cross_entropy saves (a bf16/fp16 run's fp32 copy of the logits is freed after
                 the forward). Times the micro-batches in flight, read off DeepSpeed's own schedule
                 (train/planning/schedules.py): under 1F1B min(p - s, m) on stage s; under DualPipeV the peak
                 over the rank's instructions of both its stages' in-flight micro-batches, each times its
                 stage's bytes (without checkpointing every micro-batch in flight keeps its own constant: its
                 own W + BA copies). Once, on the rank with the head (`loss_path_bytes`): the loss's backward,
                 b s V x 8 (nll_loss's fp32 gradient and log_softmax's, both alive in log_softmax's backward)
                 or, when the head's weight trains, its V x h x w weight gradient before it is added to
                 `.grad` (from the second micro-batch on), whichever is larger; and under 1F1B the logits
                 DeepSpeed 0.19.8 leaves in the last stage's output buffers (`kept_logits`)
    kept logits  1F1B's last stage: DeepSpeed 0.19.8's pipe engine returns from a last stage's backward before it
                 clears `pipe_buffers['outputs']`, and TrainSchedule gives every stage max(2, ...) buffers,
                 so the logits of the last min(2, m) micro-batches stay alive, b s V w each: one more than
                 the micro-batch in flight during the backward pass, both during the optimizer step

With tensor parallelism t, P_s is what one rank of the slice group holds (its decoder layers' cut parameters / t,
the rest whole) and r = world / (stages x t); the activations are a cut layer's (train/planning/tensor_parallel.py).

The peak is the larger of the backward pass (weights, optimizer, bucket, accumulated gradients,
activations) and the optimizer step (weights, optimizer, bucket, step gradients, kept logits): activations are
freed before the step. Checked against measured memory in `bench/memory_bench.py` and the tests.
"""

from dataclasses import dataclass

from models.architecture import DECODER, Architecture
from models.deepspeed_internals import deepspeed_partition
from models.flops import flops_partition
from models.lora import AdapterPlan, adapter_parameters
from models.pipeline import LAYER_CLASSES
from models.quantize import Quantization, quantized_parameters
from train.config.ds_config import batch_layout
from train.errors import ConfigError
from train.observe.mfu import training_dtype
from train.planning.activations import SavedBytes, decoder_saved_bytes
from train.planning.schedules import peak_in_flight, rank_layer_ranges, stages_per_rank
from train.planning.tensor_parallel import rank_layer_flops, rank_layer_parameters


def layer_names(arch: Architecture) -> list[str]:
    """The class name of every pipeline layer, as DeepSpeed names the stages' layers."""
    return [LAYER_CLASSES[layer.kind].__name__ for layer in arch.pipeline_layers()]


def stage_bounds(arch: Architecture, stages: int, method: str, seq_len: int) -> list[int]:
    """Stage bounds as the pipeline module makes them: ours for `flops`, DeepSpeed's for its own methods."""
    if method.lower() == "flops":
        return flops_partition(arch, seq_len, stages)
    bounds = deepspeed_partition(
        method, stages=stages, parameters=arch.layer_parameters(), layer_names=layer_names(arch)
    )
    if bounds is None:
        raise ConfigError(f"the planner knows flops, parameters, uniform and type:<regex>, not {method.lower()!r}")
    return bounds


@dataclass
class StagePlan:
    stage: int  # the pipeline rank
    layers: list[str]
    parameters: int  # what this rank holds (a tied embedding on both ends), adapters not counted
    memory: dict[str, float]  # bytes by kind: weights, optimizer, reduction, backward/step gradients, activations,
    # kept_logits (what DeepSpeed's output buffers hold during the optimizer step)
    trainable: int  # what trains: all of `parameters`, or with LoRA the rank's adapters
    bounds: list[tuple[int, int]]  # [start, stop) of each stage the rank holds: two under DualPipeV
    flops: float = 0.0  # forward + backward FLOPs per token of the rank's layers (mixtures of experts: active ones)

    @property
    def peak(self) -> float:
        m = self.memory
        held = m["weights"] + m["optimizer"] + m["reduction"]
        return held + max(m["backward_gradients"] + m["activations"], m["step_gradients"] + m["kept_logits"])


def state_widths(ds_config: dict, data_parallel: int) -> tuple[int, int, float, float, int]:
    """Bytes per parameter of the weights, the gradients, the optimizer states and the step's fp32 gradients (ZeRO-1
    partitions the last two over the replicas), and the ZeRO reduction bucket's parameter count (0 without ZeRO)."""
    dtype = training_dtype(ds_config)
    width = 4 if dtype == "fp32" else 2
    grad_width = 4 if dtype == "fp32" or ds_config.get("data_types", {}).get("grad_accum_dtype") == "fp32" else width
    zero_config = ds_config.get("zero_optimization", {})
    zero = zero_config.get("stage", 0) >= 1
    bucket = int(float(zero_config.get("reduce_bucket_size", 5e8))) if zero else 0
    replicas = data_parallel if zero else 1
    optimizer_width = 12 / replicas if zero or dtype != "fp32" else 8
    return width, grad_width, optimizer_width, (12 / replicas if zero else 4), bucket


def plan_stages(
    arch: Architecture,
    ds_config: dict,
    *,
    stages: int,
    data_parallel: int,
    seq_len: int,
    method: str,
    checkpoint_interval: int = 0,
    adapters: AdapterPlan | None = None,
    quantization: Quantization | None = None,
    schedule: str = "1f1b",
    tensor_parallel: int = 1,
) -> list[StagePlan]:
    """Memory per pipeline rank (`stages` of them; two stages each under DualPipeV). With `adapters` (LoRA) a rank
    holds its frozen weights and its adapters at the training width, and only the adapters have gradients, optimizer
    states and ZeRO buckets; with `quantization` (QLoRA) the decoder's linear weights take `bytes_per_weight`; with
    `tensor_parallel` t, one rank of a slice group (train/planning/tensor_parallel.py)."""
    batch, dtype = batch_layout(ds_config, data_parallel), training_dtype(ds_config)
    width, grad_width, optimizer_width, step_width, bucket = state_widths(ds_config, data_parallel)
    names, counts = layer_names(arch), rank_layer_parameters(arch, tensor_parallel)
    adapter_counts = adapter_parameters(arch, adapters) if adapters is not None else None
    quantized_counts = quantized_layer_parameters(arch) if quantization is not None else [0] * len(counts)
    tokens, h, vocab = seq_len * batch.micro_batch_size, arch.hidden_size, arch.config.vocab_size
    block_bytes = [b.micro_batch(tokens) for b in layer_activations(arch, dtype, seq_len, adapters, tensor_parallel)]
    stored = [tokens * h * width if checkpoint_interval and b else b for b in block_bytes]  # checkpointed: input
    flops = rank_layer_flops(arch, seq_len, tensor_parallel)
    logits, loss_extra, kept = head_stage_bytes(
        tokens, vocab, h, width, batch.num_micro_batches, schedule=schedule, full_head=adapters is None
    )
    bounds = stage_bounds(arch, stages * stages_per_rank(schedule), method, seq_len)
    plans = []
    for rank, ranges in enumerate(rank_layer_ranges(bounds, stages, schedule)):  # by phase
        layers = [i for start, stop in ranges for i in range(start, stop)]
        both_ends = arch.tied and 0 in layers and len(names) - 1 in layers  # one module: the tied weight once
        params = sum(counts[i] for i in (layers[:-1] if both_ends else layers))
        trainable = sum(adapter_counts[i] for i in layers) if adapter_counts is not None else params
        held = params + (trainable if adapter_counts is not None else 0)
        # One micro-batch's activations of each phase's stage, times the micro-batches the schedule keeps in flight.
        phase_bytes = [sum(stored[start:stop]) + (logits if stop == len(names) else 0) for start, stop in ranges]
        activations = peak_in_flight(
            schedule, stages, micro_batches=batch.num_micro_batches, rank=rank, phase_bytes=phase_bytes
        )
        if checkpoint_interval:  # one block's full set during its recomputation: its weight-sized constant once
            activations += max(block_bytes[i] for i in layers)
        has_head = len(names) - 1 in layers
        activations += loss_extra if has_head else 0
        quantized = sum(quantized_counts[i] for i in layers)
        memory = {
            "weights": (held - quantized) * width + quantized * (quantization.bytes_per_weight() if quantized else 0),
            "optimizer": trainable * optimizer_width,
            "reduction": min(trainable, bucket) * grad_width,
            "backward_gradients": trainable * grad_width,
            "step_gradients": trainable * step_width,
            "activations": activations,
            "kept_logits": kept if has_head else 0,
        }
        stage = dict(parameters=params, memory=memory, trainable=trainable, bounds=ranges)
        plans.append(StagePlan(rank, [names[i] for i in layers], **stage, flops=sum(flops[i] for i in layers)))
    return plans


def head_stage_bytes(
    tokens: int, vocab: int, hidden: int, width: int, micro_batches: int, *, schedule: str, full_head: bool
) -> tuple[int, int, int]:
    """The stage with the head: (per micro-batch in flight, the logits and the fp32 log-softmax saved for backward;
    added during a backward, one through the loss at a time and, under 1F1B, the other output buffer's logits; the
    logits DeepSpeed keeps in its output buffers through the optimizer step). The head's weight trains in full
    fine-tuning only (LoRA on the head trains its small A and B)."""
    logits = tokens * vocab * (width + 4)
    loss_path = loss_path_bytes(tokens, vocab, hidden, width, full_head and micro_batches > 1)
    kept = min(2, micro_batches) * tokens * vocab * width if schedule == "1f1b" else 0
    return logits, loss_path + max(kept - tokens * vocab * width, 0), kept


def loss_path_bytes(tokens: int, vocab: int, hidden: int, width: int, head_weight_gradient: bool) -> int:
    """The most the loss's backward adds, once, to what the head's micro-batches in flight hold (their logits and
    log-softmax): in log_softmax's backward, nll_loss's fp32 gradient of the log-softmax and log_softmax's of the
    logits (torch 2.13 frees the first after that backward); in the head's linear backward, once `.grad` exists
    (from the second micro-batch on), its [V, h] weight gradient, in the weight's dtype, before autograd adds it to
    `.grad` (the log-softmax and the first gradient are freed by then)."""
    return max(tokens * vocab * 8, vocab * hidden * width if head_weight_gradient else 0)


def layer_activations(
    arch: Architecture, dtype: str, seq_len: int, adapters: AdapterPlan | None = None, tp: int = 1
) -> list[SavedBytes]:
    """What each pipeline layer saves for its backward (on one rank of `tp`): its decoder layer's, nothing for the
    others (the head's logits are counted apart)."""
    decoder = iter(decoder_saved_bytes(arch, dtype, seq_len, adapters, tp))
    return [next(decoder) if layer.kind == DECODER else SavedBytes(0.0, 0.0) for layer in arch.pipeline_layers()]


def quantized_layer_parameters(arch: Architecture) -> list[int]:
    """The weights of every pipeline layer that QLoRA holds in 4 bits: the decoder layers' linear ones."""
    meta = arch.meta_model()
    return [
        quantized_parameters(meta.get_submodule(layer.modules[0])) if layer.kind == DECODER else 0
        for layer in arch.pipeline_layers()
    ]


def fits(plans: list[StagePlan], gpu_bytes: float) -> bool:
    return all(p.peak <= 0.9 * gpu_bytes for p in plans)  # 10% for the framework and allocator
