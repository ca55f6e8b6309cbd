import torch
import torch.nn.functional as F

IGNORE_INDEX = -100


def next_token_cross_entropy(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Mean cross-entropy of predicting token t+1 from position t, as `GPT2LMHeadModel` computes it.

    `labels` are aligned with the inputs (labels == input_ids for plain language modelling);
    the shift happens here. Positions labelled -100 are ignored. Computed in fp32 so that
    bf16/fp16 runs report a comparable loss.
    """
    # Shift the labels, not the logits (as transformers does): slicing the logits would copy them and
    # make backward allocate a second full-size gradient, on the stage that already holds the most.
    shift_labels = F.pad(labels, (0, 1), value=IGNORE_INDEX)[..., 1:].to(logits.device)
    return F.cross_entropy(
        logits.float().reshape(-1, logits.size(-1)),
        shift_labels.reshape(-1),
        ignore_index=IGNORE_INDEX,
    )
