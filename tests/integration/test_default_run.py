"""The README's default run, shortened: embedded corpus, trained BPE, 2 CPU ranks, W&B offline, export, sample."""

from transformers import AutoModelForCausalLM, AutoTokenizer

from tests.helpers import launch, read_metrics, read_wandb_offline_run


def test_default_run_end_to_end(tmp_path):
    out = tmp_path / "run"
    proc = launch(
        [
            "--train-steps",
            20,
            "--eval-interval",
            10,
            "--log-interval",
            5,
            "--output-dir",
            out,
            "--wandb-mode",
            "offline",
        ],
        ranks=2,
        preflight=True,  # the README's command, as a user runs it
    )
    metrics = read_metrics(out)
    assert [m["step"] for m in metrics] == [5, 10, 15, 20]
    assert metrics[-1]["loss"] < metrics[0]["loss"] - 0.5, "loss is not clearly falling"
    assert "sample: And God said" in proc.stdout
    assert list((out / "wandb").glob("offline-run-*")), "no offline W&B run"
    assert (out / "tokenizer" / "tokenizer.json").exists()

    tokenizer = AutoTokenizer.from_pretrained(out / "hf")
    model = AutoModelForCausalLM.from_pretrained(out / "hf")
    assert model.config.vocab_size == len(tokenizer) == 8192
    generated = model.generate(**tokenizer("In the beginning", return_tensors="pt"), max_new_tokens=5, do_sample=False)
    assert generated.shape[1] > 3


def test_wandb_offline_run_holds_config_and_step_metrics(tmp_path):
    out = tmp_path / "run"
    launch(
        [
            "--train-steps",
            6,
            "--eval-interval",
            3,
            "--log-interval",
            1,
            "--output-dir",
            out,
            "--sample-tokens",
            4,
            "--wandb-mode",
            "offline",
            "--vocab-size",
            1024,
            "--seq-len",
            64,
        ],
        ranks=2,
    )
    config, history, tables = read_wandb_offline_run(out)
    assert {"args", "deepspeed", "topology", "model", "versions", "git_revision", "parameters"} <= config.keys()
    assert [s["stage"] for s in config["topology"]["stages"]] == [0, 1]
    assert config["deepspeed"]["zero_optimization"]["stage"] == 1
    rows = [r for r in history if "loss" in r]
    assert [r["_step"] for r in rows] == [1, 2, 3, 4, 5, 6]
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
    assert {"eval_loss", "eval_ppl"} <= next(r for r in rows if r["_step"] == 3).keys()
    assert tables == ["samples"]
    ours = read_metrics(out)
    assert [m["loss"] for m in ours] == [r["loss"] for r in rows], "metrics.jsonl and W&B disagree"
