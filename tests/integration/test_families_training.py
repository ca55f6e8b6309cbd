"""Real CPU ranks train Llama- and Qwen2-style models the same way whatever the number of stages.

pp=1, pp=2 and pp=4 (four stages: two middle stages receive and send only hidden states), and pp=2 under
DualPipeV (four stages on two ranks), run the same 6 steps from the same seeded initial weights and data:
per-step losses agree within 1e-4 relative (DualPipeV: 1e-5), and the Qwen2-style model's tied embedding and head
stay bit-identical across the first and last stage.
"""

import json

import pytest

from tests.helpers import launch, read_metrics, small_run_args, tiny_llama, write_ds_config

STEPS = 6
MODELS = {
    "llama": tiny_llama(tie_word_embeddings=False),  # untied head, GQA
    "qwen2": tiny_llama(model_type="qwen2", tie_word_embeddings=True),  # tied head, qkv bias
}


@pytest.fixture(scope="module", params=list(MODELS))
def family_runs(request, corpus, tokenizer_dir, tmp_path_factory):
    tmp = tmp_path_factory.mktemp(request.param)
    (tmp / "model.json").write_text(json.dumps(MODELS[request.param]))
    ds_config = write_ds_config(tmp / "ds.json")
    runs = {}
    for stages in (1, 2, 4, "dualpipev"):
        out = tmp / (f"pp{stages}" if stages != "dualpipev" else "pp2_dualpipev")
        args = small_run_args(corpus, tokenizer_dir, tmp, ds_config, tmp / "model.json", STEPS)
        ranks = 2 if stages == "dualpipev" else stages
        layout = ["--pipeline-stages", ranks] + (["--schedule", "dualpipev"] if stages == "dualpipev" else [])
        launch([*args, *layout, "--output-dir", out], ranks=ranks)
        runs[stages] = out
    return request.param, runs


def test_one_two_and_four_stages_train_the_same_losses(family_runs):
    family, runs = family_runs
    losses = {stages: [m["loss"] for m in read_metrics(out)] for stages, out in runs.items()}
    assert len(losses[1]) == STEPS and losses[1][-1] < losses[1][0], "loss did not fall"
    for stages in (2, 4, "dualpipev"):
        tolerance = 1e-5 if stages == "dualpipev" else 1e-4
        for ours, reference in zip(losses[stages], losses[1], strict=True):
            assert abs(ours - reference) <= tolerance * abs(reference), (family, stages, losses[stages], losses[1])


def test_four_stages_hold_the_layers_the_partition_gave_them(family_runs):
    family, runs = family_runs
    stages = json.loads((runs[4] / "run_config.json").read_text())["topology"]["stages"]
    assert len(stages) == 4 and all(s["layers"] for s in stages)
    assert stages[0]["layers"][0] == "EmbeddingPipe"
    assert stages[-1]["layers"][-1] == ("EmbeddingPipe" if family == "qwen2" else "HeadPipe")
    assert any(s["layers"] == ["DecoderLayerPipe"] * len(s["layers"]) for s in stages[1:-1]), "no middle stage"


def test_tied_copies_are_bit_identical_after_training(family_runs):
    family, runs = family_runs
    for stages in (2, 4, "dualpipev"):
        assert read_metrics(runs[stages])[-1]["tied_embedding_max_diff"] == 0.0, (family, stages)


def test_exports_of_four_and_one_stage_runs_agree(family_runs):
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    family, runs = family_runs
    pp1 = load_file(runs[1] / "hf" / "model.safetensors")
    for stages in (4, "dualpipev"):
        other = load_file(runs[stages] / "hf" / "model.safetensors")
        assert pp1.keys() == other.keys()
        assert max((pp1[k] - other[k]).abs().max().item() for k in pp1) <= 1e-5, stages
    model, info = AutoModelForCausalLM.from_pretrained(runs[4] / "hf", output_loading_info=True)
    assert not any(info.values()), info
    assert (model.get_output_embeddings().weight is model.get_input_embeddings().weight) == (family == "qwen2")


def test_four_stage_checkpoint_resumes_on_two_stages(family_runs, corpus, tokenizer_dir, tmp_path):
    """Another layout: the layer files hold every weight, wherever its stage was."""
    _, runs = family_runs
    tmp = runs[1].parent
    args = small_run_args(corpus, tokenizer_dir, tmp, tmp / "ds.json", tmp / "model.json", STEPS + 1)
    proc = launch(
        [
            *args,
            "--pipeline-stages",
            2,
            "--load",
            runs[4] / "checkpoints",
            "--reset-optimizer",
            "--output-dir",
            tmp_path / "resumed",
        ],
        ranks=2,
    )
    assert f"resumed from {runs[4] / 'checkpoints'} at step {STEPS}" in proc.stdout
    assert [m["step"] for m in read_metrics(tmp_path / "resumed")] == [STEPS + 1]
