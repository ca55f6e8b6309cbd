"""The README's default run, shortened: embedded corpus, trained BPE, 2 CPU ranks, W&B offline, export, sample."""

from transformers import AutoModelForCausalLM, AutoTokenizer

from tests.helpers import launch, read_metrics


def test_default_run_end_to_end(tmp_path):
    out = tmp_path / "run"
    proc = launch(["--train-steps", 20, "--eval-interval", 10, "--log-interval", 5, "--output-dir", out,
                   "--wandb-mode", "offline"], ranks=2)  # fmt: skip
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
