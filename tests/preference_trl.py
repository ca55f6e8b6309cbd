"""trl 1.16's DPOTrainer as the reference of the unit tests of preference training: a trainer on a few pairs, its
loss and metrics (its own `_compute_loss`), its precomputed reference log-probabilities as our table, and the check
that the pipeline's loss and metrics on the same pairs equal its."""

from collections import defaultdict

import pytest
import torch
from datasets import Dataset
from trl import DPOConfig, DPOTrainer

from models.preference_loss import PreferenceLoss, metrics_from_sums


def dpo_trainer(model, tokenizer, out, records: list[dict], **kwargs) -> DPOTrainer:
    """DPOTrainer on `records`, its reference log-probabilities precomputed at its start (as ours are), in fp32 as
    the pipeline runs here: trl 1.16's DPOConfig defaults to bf16, under which its reference pass runs in CPU
    autocast (log-probabilities off by 1e-4 relative)."""
    args = DPOConfig(
        output_dir=str(out),
        report_to=[],
        use_cpu=True,
        bf16=False,
        precompute_ref_log_probs=True,
        max_length=None,
        dataset_num_proc=None,
    )
    dataset = Dataset.from_list(records)
    return DPOTrainer(model=model, args=args, train_dataset=dataset, processing_class=tokenizer, **kwargs)


def trl_ids(trainer: DPOTrainer, records: list[dict]) -> list[tuple]:
    """(prompt_ids, chosen_ids, rejected_ids) of each record, as DPOTrainer tokenizes them."""
    dataset = trainer._prepare_dataset(Dataset.from_list(records), trainer.processing_class, trainer.args, "test")
    return [(r["prompt_ids"], r["chosen_ids"], r["rejected_ids"]) for r in dataset]


def move_off_the_reference(params) -> None:
    """Seeded noise on the trained weights, so that the rewards are not 0."""
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for param in params:
            param.add_(torch.randn(param.shape, generator=generator) * 0.05)


def pair_places(blocks: dict) -> list[tuple[int, int]]:
    """(block key, chosen answer's slot) of each pair, in the records' order: in blocks holding every pair in one or
    one pair each, `pack_pairs` places them in that order."""
    return [(key, 2 * k) for key, pairs in enumerate(blocks["loss_tokens"]) for k in range(pairs)]


def trl_reference(trainer: DPOTrainer, blocks: dict) -> torch.Tensor:
    """TRL's precomputed reference log-probabilities (its collator's) as our table: [blocks, answer slots]."""
    batch = trainer.data_collator(list(trainer.train_dataset))
    table = torch.zeros(len(blocks["loss_tokens"]), 2 * max(blocks["loss_tokens"]), dtype=torch.float64)
    for (key, slot), chosen, rejected in zip(
        pair_places(blocks), batch["ref_chosen_logps"], batch["ref_rejected_logps"], strict=True
    ):
        table[key, slot], table[key, slot + 1] = chosen, rejected
    return table


def trl_loss(trainer: DPOTrainer, loss_type: str) -> tuple[float, dict]:
    """DPOTrainer's own `_compute_loss` on its pairs as one batch, with its precomputed reference, and its six
    metrics."""
    trainer.loss_types, trainer.loss_weights = [loss_type], [1.0]
    trainer._metrics = defaultdict(lambda: defaultdict(list))
    with torch.no_grad():
        loss = trainer._compute_loss(trainer.model, trainer.data_collator(list(trainer.train_dataset)), False)
    ((_, metrics),) = trainer._metrics.items()  # "train" or "eval", as the model's mode says
    return loss.item(), {k: v[-1] for k, v in metrics.items() if k.startswith(("rewards/", "logps/"))}


def assert_loss_equals_trl(trainer: DPOTrainer, pipe, blocks: dict, reference: torch.Tensor, loss_type: str) -> None:
    """The pipeline's loss on `blocks` (the mean over their pairs, with our `reference` table) and TRL's six metrics
    equal DPOTrainer's `_compute_loss` on the same pairs."""
    expected, trl_metrics = trl_loss(trainer, loss_type)
    pipe.loss_fn = loss_fn = PreferenceLoss(loss_type=loss_type, beta=trainer.beta, reference=reference)
    rows = {k: torch.tensor(v) for k, v in blocks.items()}
    pairs = sum(blocks["loss_tokens"])
    labels = (rows["labels"], torch.tensor(1 / pairs), rows["answer_slots"], torch.arange(len(rows["labels"])))
    with torch.no_grad():
        loss = loss_fn(pipe.eval()((rows["input_ids"], rows["position_ids"])), labels).item()
    assert loss == pytest.approx(expected, rel=1e-5), loss_type
    ours = metrics_from_sums(loss_fn.take_sums())
    assert ours.pop("pairs") == pairs and ours.keys() == trl_metrics.keys()
    for name, value in trl_metrics.items():
        assert ours[name] == pytest.approx(value, rel=1e-5, abs=1e-6), (loss_type, name)
