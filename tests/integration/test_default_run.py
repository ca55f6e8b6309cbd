"""The README's default run, shortened: embedded corpus, trained BPE, 2 CPU ranks, W&B offline, export, sample."""

import pytest
from transformers import AutoModelForCausalLM, AutoTokenizer

from tests.helpers import launch, read_metrics, read_wandb_offline_run
from train.observe.quiet import FILTERED


@pytest.fixture(scope="module")
def default_run(tmp_path_factory):
    """The README's command as a user runs it (the preflight included), 20 steps, with W&B offline."""
    out = tmp_path_factory.mktemp("default") / "run"
    flags = ["--train-steps", 20, "--eval-interval", 10, "--log-interval", 5, "--wandb-mode", "offline"]
    proc = launch([*flags, "--output-dir", out], ranks=2, preflight=True)
    return out, proc


def test_default_run_end_to_end(default_run):
    out, proc = default_run
    metrics = read_metrics(out)
    assert [m["step"] for m in metrics] == [5, 10, 15, 20]
    assert metrics[-1]["loss"] < metrics[0]["loss"] - 0.5, "loss is not clearly falling"
    assert "sample: And God said" in proc.stdout
    assert not [m for m in FILTERED if m in proc.stdout + proc.stderr], "a filtered library message was printed"
    assert list((out / "wandb").glob("offline-run-*")), "no offline W&B run"
    assert (out / "tokenizer" / "tokenizer.json").exists()

    tokenizer = AutoTokenizer.from_pretrained(out / "hf")
    model = AutoModelForCausalLM.from_pretrained(out / "hf")
    assert model.config.vocab_size == len(tokenizer) == 8192
    generated = model.generate(**tokenizer("In the beginning", return_tensors="pt"), max_new_tokens=5, do_sample=False)
    assert generated.shape[1] > 3


def test_wandb_offline_run_holds_config_and_step_metrics(default_run):
    out, _ = default_run
    config, history, tables = read_wandb_offline_run(out)
    assert {"args", "deepspeed", "topology", "model", "versions", "git_revision", "parameters"} <= config.keys()
    assert [s["stage"] for s in config["topology"]["stages"]] == [0, 1]
    assert config["deepspeed"]["zero_optimization"]["stage"] == 1
    rows = [r for r in history if "loss" in r]
    assert [r["_step"] for r in rows] == [5, 10, 15, 20]
    expected = {
        "loss",
        "ppl",
        "lr",
        "grad_norm",
        "tokens_per_sec",
        "samples_per_sec",
        "step_time",
        "tflops_per_device",
        "data_wait",
        "peak_mem_mb/stage0",
        "peak_mem_mb/stage1",
        "model_mem_mb/stage0",
        "model_mem_mb/stage1",
    }
    assert all(expected <= r.keys() for r in rows)
    assert all("mfu" not in r for r in rows), "MFU on a CPU must be n/a unless --peak-tflops is given"
    assert {"eval_loss", "eval_ppl"} <= next(r for r in rows if r["_step"] == 10).keys()
    assert tables == ["samples"]
    ours = read_metrics(out)
    assert [m["loss"] for m in ours] == [r["loss"] for r in rows], "metrics.jsonl and W&B disagree"
