"""Preference (DPO) training over real ranks, from a saved tiny Llama (random LoRA adapter beside it).

* The same 6 steps (packed pairs, 4 micro-batches of 2 blocks, no LR schedule or clipping so that a plain AdamW loop
  can follow) as pp=1, pp=2, pp=2 x dp=2 and DualPipeV: every layout trains pp=1's losses and TRL's metrics, and
  pp=1 those of a plain PyTorch loop computing TRL's loss on the HF model; the reference table equals the
  starting model's log-probabilities.
* LoRA from a given adapter (`--peft-config`, pp=2): the reference is the adapter as given (TRL 1.16's copied "ref"
  adapter), and the run trains the losses of a plain loop on `PeftModel.from_pretrained`.
* A pp=2 run SIGKILLed after its first checkpoint resumes in its folder, reading the saved reference, bit for bit.
* A learnable preference (chosen answers close with one word, rejected with another): held-out reward accuracy
  above 0.9 and the exported model prefers the chosen close on pairs it never saw.
"""

import itertools
import json
from pathlib import Path

import pytest
import torch
from peft import PeftModel
from transformers import AutoModelForCausalLM, AutoTokenizer

from models.preference_loss import METRICS
from tests.cases import peft_reference
from tests.helpers import (
    kill_one_rank_after_first_checkpoint,
    launch,
    read_metrics,
    small_run_args,
    tiny_llama,
    write_ds_config,
)
from tests.preference_reference import document_logps, plain_dpo_loss
from train.checkpoint.manifest import latest_tag
from train.data.examples import DataFormat
from train.data.sources import embedded_corpus, resolve_sources
from train.data.splits import packed_dataset

STEPS, SEQ_LEN, MICRO_BATCH, GLOBAL_BATCH, VAL_FRACTION = 6, 96, 2, 8, 0.2
LAYOUTS = {  # name: (ranks, flags); DualPipeV needs 2 x ranks micro-batches: 4
    "pp1": (1, ["--pipeline-stages", 1]),
    "pp2": (2, ["--pipeline-stages", 2]),
    "pp2_dp2": (4, ["--pipeline-stages", 2]),
    "dualpipev": (2, ["--pipeline-stages", 2, "--schedule", "dualpipev"]),
}


def verses(start: int, n: int) -> list[list[str]]:
    lines = itertools.islice(open(embedded_corpus()), start, start + 3 * n)
    return [v for v in (json.loads(line)["text"].split() for line in lines) if len(v) >= 8][:n]


def preference_pairs(n: int) -> list[dict]:
    """Pairs from the corpus: a verse's start, its own end (chosen) and another verse's end (rejected)."""
    found = verses(0, n + 1)
    return [
        {"prompt": " ".join(v[:3]), "chosen": " " + " ".join(v[3:8]), "rejected": " " + " ".join(w[3:6])}
        for v, w in zip(found, found[1:], strict=False)
    ]


def write_pairs(path: Path, pairs: list[dict]) -> Path:
    path.write_text("".join(json.dumps(p) + "\n" for p in pairs))
    return path


@pytest.fixture(scope="module")
def setup(chat_tokenizer_dir, tmp_path_factory):
    """The pairs, the model (base/ and a LoRA adapter/ with lora_B off zero) and the runs' flags (`run_args`:
    other flags, as for `small_run_args`)."""
    tmp = tmp_path_factory.mktemp("dpo")
    tokenizer = AutoTokenizer.from_pretrained(chat_tokenizer_dir)
    settings = tiny_llama(vocab_size=len(tokenizer), max_position_embeddings=128)
    peft_reference(settings.pop("model_type"), settings, tmp)
    ds = write_ds_config(tmp / "ds.json", GLOBAL_BATCH, MICRO_BATCH, scheduler=None, gradient_clipping=None)
    pairs = write_pairs(tmp / "pairs.jsonl", preference_pairs(200))

    def run_args(**overrides) -> list:
        flags = dict(data_format="preference", seq_len=SEQ_LEN, eval_blocks=8, model=tmp / "base", trace_batches=True,
                     save_interval=3, val_fraction=VAL_FRACTION, sample_tokens=0)  # fmt: skip
        return small_run_args(pairs, chat_tokenizer_dir, tmp, ds, None, STEPS, **(flags | overrides))

    return tmp, run_args


@pytest.fixture(scope="module")
def runs(setup) -> dict[str, Path]:
    tmp, run_args = setup
    args, out = run_args(), {}
    for name, (ranks, layout) in LAYOUTS.items():
        out[name] = tmp / name
        launch([*args, *layout, "--output-dir", out[name]], ranks)
    return out


def training_blocks(tmp: Path, tokenizer_dir: Path):
    """The training blocks the runs read (their cache), indexed as `--trace-batches` records them."""
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    sources = resolve_sources([str(tmp / "pairs.jsonl")])
    return packed_dataset(sources, DataFormat("preference"), tokenizer, seq_len=SEQ_LEN, val_fraction=VAL_FRACTION,
                          cache_dir=tmp / "cache")["train"]  # fmt: skip


def replay_dpo(model, run: Path, blocks) -> list[float]:
    """`model` trained by hand with TRL's loss on the blocks `run`'s first stage fed, step by step, against the
    run's reference table (checked first to be `model`'s own log-probabilities): torch's AdamW as the runs' JSON
    (lr 3e-3, weight decay 0.1 on matrices; every LoRA matrix is one). Per-step losses."""
    table = torch.load(run / "reference.pt", weights_only=True)
    with torch.no_grad():
        for key in range(len(blocks)):
            for slot, (logp, _) in document_logps(model.eval(), blocks[key]).items():
                assert table[key, slot].item() == pytest.approx(logp.item(), rel=1e-5), (key, slot)
    trained = [p for p in model.parameters() if p.requires_grad]
    groups = [{"params": [p for p in trained if p.dim() >= 2]}]
    groups += [{"params": [p for p in trained if p.dim() < 2], "weight_decay": 0.0}]
    optimizer = torch.optim.AdamW(groups, lr=3e-3, weight_decay=0.1)
    trace = [json.loads(line) for line in (run / "batches" / "stage0_dp0.jsonl").read_text().splitlines()]
    losses = []
    for step in range(1, STEPS + 1):
        keys = [k for record in trace if record["step"] == step for k in record["blocks"]]
        loss = plain_dpo_loss(model.train(), [blocks[k] for k in keys], keys, table, "sigmoid")
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    return losses


def test_every_layout_trains_the_losses_and_metrics_of_one_stage(runs):
    pp1 = read_metrics(runs["pp1"])
    assert len(pp1) == STEPS
    assert pp1[0]["loss"] == pytest.approx(torch.nn.functional.softplus(torch.tensor(0.0)).item(), rel=1e-5)
    assert pp1[0]["rewards/margins"] == pytest.approx(0.0, abs=1e-6)  # step 1 runs the reference's weights: log 2
    assert pp1[-1]["loss"] < pp1[0]["loss"] and all(f"eval_{name}" in pp1[-1] for name in METRICS)
    for name in LAYOUTS.keys() - {"pp1"}:
        ours = read_metrics(runs[name])
        assert len(ours) == STEPS, name
        for mine, reference in zip(ours, pp1, strict=True):
            assert mine["loss"] == pytest.approx(reference["loss"], rel=1e-5), name
            assert mine["pairs"] == reference["pairs"], name
            for metric in METRICS:
                assert mine[metric] == pytest.approx(reference[metric], rel=1e-5, abs=1e-7), (name, metric)


def test_one_stage_trains_the_losses_of_a_plain_loop_on_the_hf_model(setup, runs, chat_tokenizer_dir):
    """The reference table equals the starting model's log-probabilities of every answer, and each step's loss the
    mean of TRL's loss over its pairs, the HF model trained by torch's AdamW."""
    tmp, _ = setup
    model = AutoModelForCausalLM.from_pretrained(tmp / "base", dtype=torch.float32)
    losses = replay_dpo(model, runs["pp1"], training_blocks(tmp, chat_tokenizer_dir))
    logged = [m["loss"] for m in read_metrics(runs["pp1"])]
    assert logged == pytest.approx(losses, rel=1e-5)


def test_lora_from_an_adapter_trains_the_losses_of_a_plain_loop_on_peft(setup, chat_tokenizer_dir):
    """`--peft-config` with a trained adapter: the reference is that adapter (its log-probabilities, not the
    base's), and pp=2 trains the losses of peft's model trained by hand."""
    tmp, run_args = setup
    launch([*run_args(), *LAYOUTS["pp2"][1], "--peft-config", tmp / "adapter", "--output-dir", tmp / "lora"], 2)
    base = AutoModelForCausalLM.from_pretrained(tmp / "base", dtype=torch.float32)
    model = PeftModel.from_pretrained(base, tmp / "adapter", is_trainable=True)
    losses = replay_dpo(model, tmp / "lora", training_blocks(tmp, chat_tokenizer_dir))
    assert [m["loss"] for m in read_metrics(tmp / "lora")] == pytest.approx(losses, rel=1e-5)
    assert (tmp / "lora" / "adapter").is_dir()


def test_a_sigkilled_run_resumes_bit_for_bit_with_its_reference(setup, runs):
    tmp, run_args = setup
    args, killed = run_args(), tmp / "killed"
    kill_one_rank_after_first_checkpoint([*args, *LAYOUTS["pp2"][1]], 2, killed)
    resumed_at = int(latest_tag(killed / "checkpoints").removeprefix("step_"))
    assert resumed_at < STEPS and (killed / "reference.pt").is_file()
    proc = launch([*args, *LAYOUTS["pp2"][1], "--output-dir", killed, "--load", killed / "checkpoints"], 2)
    assert "reference log-probabilities of" not in proc.stdout, "the reference was computed again"
    before, after = read_metrics(runs["pp2"]), {m["step"]: m for m in read_metrics(killed)}
    for m in before[resumed_at:]:
        assert after[m["step"]]["loss"] == m["loss"]
        assert after[m["step"]]["rewards/margins"] == m["rewards/margins"]


def closing_pairs(found: list[list[str]], chosen: str, rejected: str) -> list[dict]:
    return [{"prompt": " ".join(v[:3]), "chosen": f" {' '.join(v[3:7])} {chosen}",
             "rejected": f" {' '.join(v[3:7])} {rejected}"} for v in found]  # fmt: skip


def preference_rate(model, tokenizer, pairs: list[dict]) -> tuple[float, float]:
    """The share of pairs whose chosen answer the model finds likelier, and the mean log-probability margin."""
    margins = []
    with torch.no_grad():
        for pair in pairs:
            scores = []
            for answer in (pair["chosen"], pair["rejected"]):
                ids = tokenizer(pair["prompt"] + answer + tokenizer.eos_token, return_tensors="pt").input_ids
                start = len(tokenizer(pair["prompt"]).input_ids)
                logps = model(ids).logits[0, :-1].log_softmax(-1).gather(1, ids[0, 1:, None])[:, 0]
                scores.append(logps[start - 1 :].sum().item())
            margins.append(scores[0] - scores[1])
    return sum(m > 0 for m in margins) / len(margins), sum(margins) / len(margins)


def test_a_learnable_preference_is_learnt_and_exported(setup, chat_tokenizer_dir):
    """Chosen answers close with one word, rejected ones with another, the chosen being the close the starting model
    finds less likely on 40 pairs it never trains on: 40 steps later the held-out reward accuracy is above 0.9 and
    the exported model prefers the chosen close on those 40 pairs."""
    tmp, run_args = setup
    tokenizer = AutoTokenizer.from_pretrained(chat_tokenizer_dir)
    start = AutoModelForCausalLM.from_pretrained(tmp / "base", dtype=torch.float32).eval()
    unseen = verses(2000, 40)
    _, margin = preference_rate(start, tokenizer, closing_pairs(unseen, "Amen.", "Selah."))
    chosen, rejected = ("Selah.", "Amen.") if margin > 0 else ("Amen.", "Selah.")
    data = write_pairs(tmp / "closing.jsonl", closing_pairs(verses(0, 240), chosen, rejected))
    out, steps = tmp / "learnt", 40
    launch([*run_args(data=data, data_cache_dir=tmp / "closing_cache", train_steps=steps, eval_interval=steps,
                      eval_blocks=16, output_dir=out), "--pipeline-stages", 1], 1)  # fmt: skip
    assert read_metrics(out)[-1]["eval_rewards/accuracies"] > 0.9
    exported = AutoModelForCausalLM.from_pretrained(out / "hf", dtype=torch.float32).eval()
    rate, margin = preference_rate(exported, tokenizer, closing_pairs(unseen, chosen, rejected))
    assert rate > 0.9 and margin > 0, (rate, margin)
