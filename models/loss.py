import torch
import torch.nn.functional as F

IGNORE_INDEX = -100


def next_token_cross_entropy(
    logits: torch.Tensor, labels: torch.Tensor | tuple[torch.Tensor, torch.Tensor]
) -> torch.Tensor:
    """Cross-entropy of predicting token t+1 from position t, as `GPT2LMHeadModel` computes it.

    `labels` are aligned with the inputs (labels == input_ids for plain language modelling);
    the shift happens here. Positions labelled -100 are ignored. Computed in fp32 so that
    bf16/fp16 runs report a comparable loss.

    Plain labels give the mean over this micro-batch. `(labels, scale)` (instruction and chat data, whose
    micro-batches hold different numbers of answer tokens) gives the sum times `scale` = micro-batches x
    replicas / answer tokens of the whole global batch: DeepSpeed then averages micro-batches and replicas
    into the mean over every answer token of the step, which is what `AutoModelForCausalLM(input_ids,
    labels=labels).loss` computes over the global batch. A micro-batch without answer tokens adds 0, not NaN.
    """
    scale = None
    if isinstance(labels, tuple | list):
        labels, scale = labels
    # Shift the labels, not the logits (as transformers does): slicing the logits would copy them and
    # make backward allocate a second full-size gradient, on the stage that already holds the most.
    shift_labels = F.pad(labels, (0, 1), value=IGNORE_INDEX)[..., 1:].to(logits.device)
    loss = F.cross_entropy(
        logits.float().reshape(-1, logits.size(-1)),
        shift_labels.reshape(-1),
        ignore_index=IGNORE_INDEX,
        reduction="mean" if scale is None else "sum",
    )
    return loss if scale is None else loss * scale.to(loss.device)
