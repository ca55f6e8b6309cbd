"""The plain PyTorch reference of preference training, shared by the unit and the integration tests: each document of
a packed block run alone through the HF model, and TRL's loss (`pair_losses`, checked equal to DPOTrainer's own in
tests/unit/test_preference.py) averaged over a global batch's pairs."""

import torch

from models.preference_loss import pair_losses


def document_logps(model, row: dict) -> dict[int, tuple[torch.Tensor, torch.Tensor]]:
    """{answer slot: (summed log-probability of its labelled tokens, its tokens)} of one block, each document run
    alone through the HF model (the plain reference for the packed pipeline)."""
    row = {k: v.tolist() if isinstance(v, torch.Tensor) else v for k, v in row.items()}  # a torch-formatted row
    starts = [i for i, p in enumerate(row["position_ids"]) if p == 0] + [len(row["position_ids"])]
    out = {}
    for a, b in zip(starts[:-1], starts[1:], strict=True):
        slots = [s for s in row["answer_slots"][a:b] if s >= 0]
        if not slots:
            continue  # the padding
        logits = model(torch.tensor([row["input_ids"][a:b]])).logits[0, :-1].float()
        labels = torch.tensor(row["labels"][a + 1 : b])
        picked = logits.log_softmax(-1).gather(1, labels.clamp(min=0)[:, None])[:, 0]
        out[slots[0]] = (picked[labels != -100].sum(), torch.tensor(float(len(slots))))
    return out


def plain_dpo_loss(model, rows: list[dict], keys: list[int], reference: torch.Tensor, loss_type: str) -> torch.Tensor:
    """TRL's loss (`pair_losses`) averaged over the pairs of the blocks `rows`."""
    losses = []
    for row, key in zip(rows, keys, strict=True):
        answers = document_logps(model, row)
        for slot in range(0, max(answers) + 1, 2):
            (chosen, c_tokens), (rejected, r_tokens) = answers[slot], answers[slot + 1]
            ref_c, ref_r = reference[key, slot].float(), reference[key, slot + 1].float()
            losses.append(
                pair_losses(chosen, rejected, ref_c, ref_r, c_tokens, r_tokens, loss_type=loss_type, beta=0.1)
            )
    return torch.stack(losses).mean()
