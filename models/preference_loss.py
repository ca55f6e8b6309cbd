"""The preference (DPO) loss on the last stage, as trl 1.16's `DPOTrainer._compute_loss` defines it.

A block holds whole pairs: each pair is two documents, prompt + chosen answer and prompt + rejected answer, side
by side under document attention (train/data/preference.py). The labels tuple of a micro-batch is
`(labels, scale, answer_slots, block_keys)`:

* `labels` [B, S]: the answer tokens TRL counts (its `completion_mask` shifted by one), -100 elsewhere;
* `scale`: micro-batches x replicas / pairs of the global batch, so that DeepSpeed's mean over micro-batches and
  replicas is the mean over the global batch's pairs (TRL's `per_sequence_loss.mean()` over one batch);
* `answer_slots` [B, S]: for every answer token (TRL's unshifted `completion_mask`), 2k for the chosen and 2k + 1
  for the rejected answer of the row's k-th pair, -1 elsewhere;
* `block_keys` [B]: the row's place in the reference table (`PreferenceLoss.reference`).

An answer's log-probability is the sum of log p(label) over its labelled tokens (TRL's `per_token_logps.sum(1)`).
The reference's, computed once before training by the same stages (train/preference/reference.py), are read by
block key.
"""

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from models.loss import IGNORE_INDEX

LOSS_TYPES = ("sigmoid", "ipo")  # trl 1.16's `loss_type` names
METRICS = (
    "rewards/chosen",
    "rewards/rejected",
    "rewards/accuracies",
    "rewards/margins",
    "logps/chosen",
    "logps/rejected",
)


def answer_logps(logits: torch.Tensor, labels: torch.Tensor, slots: torch.Tensor, width: int) -> torch.Tensor:
    """[B, width]: each row's summed log-probability of every answer slot's labelled tokens (fp32)."""
    shift_labels = F.pad(labels, (0, 1), value=IGNORE_INDEX)[..., 1:].to(logits.device)
    shift_slots = F.pad(slots, (0, 1), value=-1)[..., 1:].to(logits.device)
    token_logps = -F.cross_entropy(
        logits.float().transpose(1, 2), shift_labels, ignore_index=IGNORE_INDEX, reduction="none"
    )  # [B, S], 0 where the label is -100
    target = torch.where((shift_labels != IGNORE_INDEX) & (shift_slots >= 0), shift_slots, width)
    sums = token_logps.new_zeros(labels.shape[0], width + 1)
    return sums.scatter_add(1, target, token_logps)[:, :width]


def answer_tokens(slots: torch.Tensor, width: int) -> torch.Tensor:
    """[B, width]: the tokens of every answer slot (TRL's `completion_mask.sum(1)`, which IPO divides by)."""
    target = torch.where(slots >= 0, slots, width).long()
    counts = torch.zeros(slots.shape[0], width + 1, dtype=torch.float32, device=slots.device)
    return counts.scatter_add(1, target, torch.ones_like(target, dtype=torch.float32))[:, :width]


def pair_losses(
    chosen: torch.Tensor,
    rejected: torch.Tensor,
    ref_chosen: torch.Tensor,
    ref_rejected: torch.Tensor,
    chosen_tokens: torch.Tensor,
    rejected_tokens: torch.Tensor,
    *,
    loss_type: str,
    beta: float,
) -> torch.Tensor:
    """Each pair's loss, as trl 1.16's `_compute_loss` computes `per_sequence_loss` (f_divergence reverse_kl)."""
    chosen_logratios, rejected_logratios = chosen - ref_chosen, rejected - ref_rejected
    if loss_type == "sigmoid":
        return -F.logsigmoid(beta * (chosen_logratios - rejected_logratios))
    if loss_type == "ipo":  # TRL averages over the answer's tokens (its comment: confirmed with the IPO authors)
        delta = chosen_logratios / chosen_tokens.clamp(min=1.0) - rejected_logratios / rejected_tokens.clamp(min=1.0)
        return (delta - 1 / (2 * beta)) ** 2
    raise ValueError(f"--preference-loss {loss_type}: not one of {', '.join(LOSS_TYPES)}")


def reward_sums(chosen, rejected, ref_chosen, ref_rejected, beta: float) -> torch.Tensor:
    """float64[7]: pairs, then the sums over pairs of TRL's six metrics (`METRICS`), to average over a step."""
    chosen_rewards, rejected_rewards = beta * (chosen - ref_chosen), beta * (rejected - ref_rejected)
    values = [
        torch.tensor(float(chosen.numel())),
        chosen_rewards.sum(),
        rejected_rewards.sum(),
        (chosen_rewards > rejected_rewards).float().sum(),
        (chosen_rewards - rejected_rewards).sum(),
        chosen.sum(),
        rejected.sum(),
    ]
    return torch.stack([v.detach().double().cpu() for v in values])


@dataclass
class PreferenceLoss:
    """The last stage's loss function (`loss_fn` of the pipeline). Without `reference` it records each row's answer
    log-probabilities under its block key (the reference pass; key -1: not recorded) and returns 0; with it, the
    loss, and it adds the micro-batch's metric sums to `sums`."""

    loss_type: str = "sigmoid"
    beta: float = 0.1
    reference: torch.Tensor | None = None  # [blocks, answer slots] float64, by block key
    recorded: dict[int, torch.Tensor] = field(default_factory=dict)
    sums: torch.Tensor = field(default_factory=lambda: torch.zeros(7, dtype=torch.float64))

    def __call__(self, logits: torch.Tensor, labels: tuple) -> torch.Tensor:
        labels, scale, slots, keys = labels
        width = int(slots.max().item()) + 1 if slots.numel() else 0
        width += width % 2
        logps = answer_logps(logits, labels, slots, width)
        if self.reference is None:
            for key, row in zip(keys.tolist(), logps.detach().double().cpu(), strict=True):
                if key >= 0:  # -1: a row filling up the reference pass's last step, recorded elsewhere
                    self.recorded[key] = row
            return logits.new_zeros((), dtype=torch.float32)
        ref = self.reference[keys.cpu()][:, :width].to(logps.device, torch.float32)
        tokens = answer_tokens(slots.to(logps.device), width)
        present = tokens[:, 0::2] > 0  # [B, pairs]: a row's pairs, its chosen slot holding tokens
        chosen, rejected = logps[:, 0::2][present], logps[:, 1::2][present]
        ref_chosen, ref_rejected = ref[:, 0::2][present], ref[:, 1::2][present]
        losses = pair_losses(
            chosen,
            rejected,
            ref_chosen,
            ref_rejected,
            tokens[:, 0::2][present],
            tokens[:, 1::2][present],
            loss_type=self.loss_type,
            beta=self.beta,
        )
        self.sums += reward_sums(chosen, rejected, ref_chosen, ref_rejected, self.beta)
        return losses.sum() * scale.to(losses.device)

    def take_sums(self) -> torch.Tensor:
        """The metric sums since the last call (`reward_sums`' layout), reset."""
        sums, self.sums = self.sums, torch.zeros(7, dtype=torch.float64)
        return sums


def metrics_from_sums(sums: torch.Tensor, prefix: str = "") -> dict[str, float]:
    """TRL's six metrics, each the mean over the pairs the sums hold, and `pairs`, their number."""
    pairs = float(sums[0])
    if not pairs:
        return {}
    means = {prefix + name: float(value) / pairs for name, value in zip(METRICS, sums[1:].tolist(), strict=True)}
    return means | {prefix + "pairs": int(pairs)}
