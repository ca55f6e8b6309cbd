"""Preference (DPO) training over real ranks: the reference pass before step 1, pp=2 trains pp=1's losses, pp=1
trains those of a plain PyTorch loop computing TRL's loss on the HF model, TRL's metrics are logged, and a resumed
run reads the saved reference instead of recomputing it."""

import itertools
import json

import pytest
import torch
from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

from models.preference_loss import METRICS
from tests.helpers import launch, read_metrics, small_run_args, write_ds_config
from tests.preference_reference import document_logps, plain_dpo_loss
from train.data.examples import DataFormat
from train.data.sources import embedded_corpus, resolve_sources
from train.data.splits import packed_dataset

STEPS, SEQ_LEN, MICRO_BATCH, GLOBAL_BATCH = 6, 96, 2, 4


def preference_pairs(n: int) -> list[dict]:
    """Pairs from the corpus: a verse's start, its own end (chosen) and another verse's end (rejected)."""
    verses = [json.loads(line)["text"].split() for line in itertools.islice(open(embedded_corpus()), 2 * n)]
    verses = [v for v in verses if len(v) >= 6][: n + 1]
    return [
        {"prompt": " ".join(v[:3]), "chosen": " " + " ".join(v[3:8]), "rejected": " " + " ".join(w[3:6])}
        for v, w in zip(verses, verses[1:], strict=False)
    ]


@pytest.fixture(scope="module")
def runs(chat_tokenizer_dir, tmp_path_factory):
    """6 steps of DPO (packed pairs, global batch 4 of micro-batches of 2, no LR schedule or clipping, so that a plain
    AdamW loop can follow) from a saved tiny llama as pp=1 and pp=2, and pp=2 again resumed from its step 3."""
    tmp = tmp_path_factory.mktemp("dpo")
    data = tmp / "pairs.jsonl"
    data.write_text("".join(json.dumps(p) + "\n" for p in preference_pairs(120)))
    tokenizer = AutoTokenizer.from_pretrained(chat_tokenizer_dir)
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=4, num_attention_heads=4
    )
    LlamaForCausalLM(config).save_pretrained(tmp / "model")
    ds = write_ds_config(tmp / "ds.json", GLOBAL_BATCH, MICRO_BATCH, scheduler=None, gradient_clipping=None)
    args = small_run_args(data, chat_tokenizer_dir, tmp, ds, "llama-tiny", STEPS, data_format="preference",
                          seq_len=SEQ_LEN, eval_blocks=4, model=tmp / "model", trace_batches=True, save_interval=3,
                          val_fraction=0.1, sample_tokens=0)  # fmt: skip
    args = [a for a in args if a not in ("--model-config", "llama-tiny")]
    out = {name: tmp / name for name in ("pp1", "pp2", "pp2_resumed")}
    launch([*args, "--pipeline-stages", 1, "--output-dir", out["pp1"]], 1)
    launch([*args, "--pipeline-stages", 2, "--output-dir", out["pp2"]], 2)
    resume = ["--load", out["pp2"] / "checkpoints" / "step_3", "--output-dir", out["pp2_resumed"]]
    launch([*args, "--pipeline-stages", 2, *resume], 2)
    return tmp, out


def test_two_stages_train_the_losses_and_metrics_of_one(runs):
    _, out = runs
    pp1, pp2 = read_metrics(out["pp1"]), read_metrics(out["pp2"])
    assert len(pp1) == len(pp2) == STEPS
    for ours, reference in zip(pp2, pp1, strict=True):
        assert ours["loss"] == pytest.approx(reference["loss"], rel=1e-5)
        for name in METRICS:
            assert ours[name] == pytest.approx(reference[name], rel=1e-5, abs=1e-7), name
    assert pp1[0]["loss"] == pytest.approx(torch.nn.functional.softplus(torch.tensor(0.0)).item(), rel=1e-5)
    assert pp1[0]["rewards/margins"] == pytest.approx(0.0, abs=1e-6)  # step 1 runs the reference's weights: log 2
    assert all(f"eval_{name}" in pp1[-1] for name in METRICS)


def test_one_stage_trains_the_losses_of_a_plain_loop_on_the_hf_model(runs, chat_tokenizer_dir):
    """The reference table equals the starting model's log-probabilities of every answer, and each step's loss the
    mean of TRL's loss over its pairs, the HF model trained by torch's AdamW on it (weight decay on matrices)."""
    tmp, out = runs
    tokenizer = AutoTokenizer.from_pretrained(chat_tokenizer_dir)
    blocks = packed_dataset(resolve_sources([str(tmp / "pairs.jsonl")]), DataFormat("preference"), tokenizer,
                            seq_len=SEQ_LEN, val_fraction=0.1, cache_dir=tmp / "cache")["train"]  # fmt: skip
    table = torch.load(out["pp1"] / "reference.pt", weights_only=True)
    model = LlamaForCausalLM.from_pretrained(tmp / "model")
    with torch.no_grad():
        for key in range(len(blocks)):
            for slot, (logp, _) in document_logps(model, blocks[key]).items():
                assert table[key, slot].item() == pytest.approx(logp.item(), rel=1e-5)
    trace = [json.loads(line) for line in (out["pp1"] / "batches" / "stage0_dp0.jsonl").read_text().splitlines()]
    decay = [p for p in model.parameters() if p.dim() >= 2]
    groups = [{"params": decay}, {"params": [p for p in model.parameters() if p.dim() < 2], "weight_decay": 0.0}]
    optimizer = torch.optim.AdamW(groups, lr=3e-3, weight_decay=0.1)
    for step, logged in enumerate(read_metrics(out["pp1"]), start=1):
        keys = [k for record in trace if record["step"] == step for k in record["blocks"]]
        loss = plain_dpo_loss(model.train(), [blocks[k] for k in keys], keys, table, "sigmoid")
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        assert logged["loss"] == pytest.approx(loss.item(), rel=1e-5), step


def test_a_resumed_run_reads_the_reference_and_continues_exactly(runs):
    _, out = runs
    pp2 = {m["step"]: m for m in read_metrics(out["pp2"])}
    resumed = read_metrics(out["pp2_resumed"])
    assert [m["step"] for m in resumed] == [4, 5, 6]
    for m in resumed:
        assert m["loss"] == pp2[m["step"]]["loss"]
        assert m["rewards/margins"] == pp2[m["step"]]["rewards/margins"]
