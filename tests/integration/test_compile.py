"""--compile over real ranks: every pipeline layer compiled by DeepSpeed's engine.compile trains the eager losses."""

import pytest

from tests.helpers import launch, read_metrics, small_run_args, tiny_gpt2, write_ds_config, write_json

STEPS = 5


@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_compiled_pipeline_trains_the_eager_losses(corpus, tokenizer_dir, tmp_path, family):
    """pp=2, fp32: the same per-step losses within 1e-5 (GPT-2 with activation checkpointing on top; Llama with
    document attention, whose masks transformers builds inside the compiled layers, and also compiled under
    DualPipeV, whose module compiles the layers of both its phases)."""
    model = write_json(tmp_path / "model.json", tiny_gpt2()) if family == "gpt2" else "llama-tiny"
    extra = ["--activation-checkpoint-interval", 1] if family == "gpt2" else ["--attention", "document"]
    args = small_run_args(
        corpus, tokenizer_dir, tmp_path, write_ds_config(tmp_path / "ds.json"), model, STEPS, eval_interval=STEPS
    )
    runs = {}
    modes = [("eager", []), ("compiled", ["--compile"])]
    if family == "llama":
        modes.append(("compiled_dualpipev", ["--compile", "--schedule", "dualpipev"]))
    for mode, flags in modes:
        proc = launch([*args, *extra, *flags, "--output-dir", tmp_path / mode], 2)
        runs[mode] = [m["loss"] for m in read_metrics(tmp_path / mode)]
        assert ("compile: the first step took" in proc.stdout) == (mode != "eager")
    assert len(runs["eager"]) == STEPS
    for mode, _ in modes[1:]:
        for ours, reference in zip(runs[mode], runs["eager"], strict=True):
            assert ours == pytest.approx(reference, rel=1e-5), mode
