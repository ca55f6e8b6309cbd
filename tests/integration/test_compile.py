"""--compile over real ranks: every pipeline layer compiled by DeepSpeed's engine.compile trains the eager losses."""

import pytest

from tests.helpers import launch, read_metrics, small_run_args, write_ds_config

STEPS = 5


def compiled_runs_train_the_eager_losses(eager: list[float], compiled: dict[str, list[float]]) -> None:
    assert eager
    for mode, losses in compiled.items():
        for ours, reference in zip(losses, eager, strict=True):
            assert ours == pytest.approx(reference, rel=1e-5), mode


def test_compiled_gpt2_with_activation_checkpointing_trains_the_eager_losses(gpt2_layouts, tmp_path):
    """pp=2, fp32, balanced by FLOPs with activation checkpointing: the eager run is the session's `pp2_flops_ac`
    layout run (tests/integration/conftest.py), the compiled one the same flags with --compile."""
    proc = launch([*gpt2_layouts.args["pp2_flops_ac"], "--compile", "--output-dir", tmp_path / "compiled"], 2)
    assert "compile: the first step took" in proc.stdout
    assert "compile: the first step took" not in gpt2_layouts.stdout["pp2_flops_ac"]
    eager = [m["loss"] for m in read_metrics(gpt2_layouts.runs["pp2_flops_ac"])]
    compiled_runs_train_the_eager_losses(eager, {"compiled": [m["loss"] for m in read_metrics(tmp_path / "compiled")]})


def test_compiled_llama_with_document_attention_trains_the_eager_losses(corpus, tokenizer_dir, tmp_path):
    """pp=2, fp32, the same per-step losses within 1e-5: Llama with document attention, whose masks transformers
    builds inside the compiled layers, compiled under DualPipeV, whose module compiles the layers of both its phases
    (1F1B's compiled layers are the GPT-2 test's)."""
    args = small_run_args(
        corpus, tokenizer_dir, tmp_path, write_ds_config(tmp_path / "ds.json"), "llama-tiny", STEPS, eval_interval=STEPS
    )
    runs = {}
    modes = [
        ("eager", []),
        ("compiled_dualpipev", ["--compile", "--schedule", "dualpipev"]),
    ]
    for mode, flags in modes:
        proc = launch([*args, "--attention", "document", *flags, "--output-dir", tmp_path / mode], 2)
        runs[mode] = [m["loss"] for m in read_metrics(tmp_path / mode)]
        assert ("compile: the first step took" in proc.stdout) == (mode != "eager")
    assert len(runs["eager"]) == STEPS
    compiled_runs_train_the_eager_losses(runs.pop("eager"), runs)
