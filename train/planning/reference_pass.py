"""Preference training's reference pass, planned (docs/preference.md: The reference model): its time and memory,
printed under the plan's table for `--data-format preference`.

Before step 1, one forward-only pass (`engine.eval_batch`, DeepSpeed 0.19.8's InferenceSchedule) runs every
training block and the evaluated validation blocks through the stages (train/preference/reference.py).

* Time. models/flops.py counts a trained token as 6 N + 12 L a s FLOPs (forward + backward); its forward is
  2 N + 4 L a s, exactly a third. The forward-only schedule idles (p - 1) / (m + p - 1) of its steps, as 1F1B
  does, so at the step's MFU the pass takes a third of a step's time per global batch of blocks: per epoch of
  training blocks, a third of that epoch's training time (a one-epoch run: 1/4 of reference + training).
* Memory. The last stage keeps a float64 table [blocks, answer slots] (two slots a pair, as many as the fullest
  block's pairs) in host memory: `reference_pass` builds it on the CPU, none of it on the GPU. `eval_batch` runs
  under no_grad: nothing is saved for a backward. Its largest activations are the last stage's: the logits of
  the two micro-batches its two pipe buffers hold (InferenceSchedule.num_pipe_buffers() = 2; the engine keeps a
  forward's outputs in `pipe_buffers['outputs']`), b s V w each, and in the loss (models/preference_loss.py:
  answer_logps) their fp32 copy (bf16/fp16 only; fp32's `.float()` is the tensor itself) and cross_entropy's
  fp32 log-softmax, b s V 4 each. Training's last stage holds more (its logits and fp32 log-softmax per
  micro-batch in flight, the loss's 8 b s V backward, the kept logits): the plan's peak holds.
"""

from dataclasses import dataclass

from models.architecture import Architecture
from train.config.ds_config import batch_layout
from train.planning.memory_model import StagePlan, state_widths

FORWARD_SHARE = 1 / 3  # of models/flops.py's forward + backward FLOPs: (2 N + 4 L a s) / (6 N + 12 L a s)
TABLE_BYTES = 8  # float64, one per answer
SLOTS_PER_PAIR = 2  # chosen and rejected


@dataclass(frozen=True)
class ReferencePass:
    flops_per_step: float  # one forward over a global batch of blocks
    seconds_per_step: float  # that forward at the step's MFU (nan without a peak FLOP/s)
    epoch_blocks: int  # --train-steps x the global batch: the training blocks if the run is one epoch
    table_bytes_per_pair: int  # epoch_blocks x 2 slots x 8 bytes, for each pair the fullest block holds
    eval_bytes: float  # eval_batch's largest activations: the last stage's
    train_bytes: float  # training's activations on the rank with the head (the plan's)


def plan_reference_pass(
    arch: Architecture,
    ds_config: dict,
    plans: list[StagePlan],
    *,
    data_parallel: int,
    seq_len: int,
    train_steps: int,
    flops_step: float,
    step_time: float,
) -> ReferencePass:
    """The reference pass of a planned run (its stages' `plans`), from its shapes and its step's FLOPs and time."""
    batch = batch_layout(ds_config, data_parallel)
    width = state_widths(ds_config, data_parallel)[0]
    logits = batch.micro_batch_size * seq_len * arch.config.vocab_size
    fp32_copy = 4 if width != 4 else 0
    last_layer = len(arch.pipeline_layers())
    head = next(p for p in plans if any(stop == last_layer for _, stop in p.bounds))
    blocks = train_steps * batch.global_batch
    return ReferencePass(
        flops_per_step=flops_step * FORWARD_SHARE,
        seconds_per_step=step_time * FORWARD_SHARE,
        epoch_blocks=blocks,
        table_bytes_per_pair=blocks * SLOTS_PER_PAIR * TABLE_BYTES,
        eval_bytes=logits * (2 * width + fp32_copy + 4),
        train_bytes=head.memory["activations"],
    )


def reference_lines(ref: ReferencePass, train_steps: int, mfu: float, lora: bool) -> list[str]:
    """The plan's two lines on the reference pass: its time, its memory."""
    timed = ref.seconds_per_step == ref.seconds_per_step  # not nan: the GPU has a peak FLOP/s
    per_step = f"{ref.seconds_per_step:.3g} s per step's blocks at {mfu:.0%} MFU" if timed else "no time"
    one_epoch = f"{train_steps * ref.seconds_per_step:,.0f} s, " if timed else ""
    # LoRA's step does about 4 of the 6 N: no weight gradients for the frozen base; recomputation adds 2 N back.
    lora_text = "; LoRA: up to 1/2 of a step (no weight gradients for the frozen base)" if lora else ""
    return [
        "reference pass (before step 1): one forward-only pass (eval_batch) over the training blocks and the "
        f"evaluated validation blocks, 1/3 of training them: {ref.flops_per_step / 1e15:.3g} PFLOP and {per_step}; "
        f"per epoch of training blocks, 1/3 of its training time: if the {train_steps} steps are one epoch, "
        f"{one_epoch}25% of reference + training (k epochs: 1/(3k+1)){lora_text}",
        "reference memory: the last stage's table, blocks x answer slots x 8 bytes in host memory (float64, CPU): "
        f"{ref.epoch_blocks:,} blocks ({train_steps} steps, one epoch) x 2 slots x 8 B = "
        f"{ref.table_bytes_per_pair / 2**20:.3g} MiB per pair of the fullest block (--packing pad: one); "
        f"eval_batch's activations, the last stage's two buffered logits and fp32 log-softmax, "
        f"{ref.eval_bytes / 2**30:.3g} GiB, below training's {ref.train_bytes / 2**30:.3g} GiB: the peaks hold",
    ]
