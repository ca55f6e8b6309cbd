"""`--tensor-parallel` before any rank starts: what it cannot run with is one line each (the preflight, in-process),
and the layout a checkpoint records carries the tensor-parallel size; a TP checkpoint saved before its slices were
declared is refused in another layout."""

import json

import pytest

from tests.helpers import run_preflight, tiny_llama, write_ds_config, write_json
from train.checkpoint.manifest import LATEST, MANIFEST, layout_of, saved_layout
from train.checkpoint.universal import SLICES_DECLARED


def run_flags(good: dict, tmp_path) -> list:
    """A tiny Llama (4 heads, 2 key/value heads) on 2 stages, 32-token blocks."""
    model = write_json(tmp_path / "llama.json", tiny_llama())
    return ["--deepspeed_config", good["config"], "--data", good["data"], "--tokenizer", good["tokenizer"],
            "--model-config", model, "--pipeline-stages", 2, "--seq-len", 32,
            "--output-dir", tmp_path / "run"]  # fmt: skip


@pytest.mark.parametrize(
    "world, extra, expected",
    [
        (6, [], "world size 6 is not divisible by --pipeline-stages 2 x --tensor-parallel 2; launch a multiple of 4"),
        (4, ["--lora-rank", 4], "--tensor-parallel 2 does not run with --lora-rank/--peft-config"),
        (4, ["--schedule", "dualpipev"], "--tensor-parallel 2 does not run with --schedule dualpipev"),
        (8, ["--tensor-parallel", 4], "2 key/value heads, which do not divide among 4 ranks"),
        (4, ["--model-config", "gpt2"], "no tensor-parallel plan"),
    ],
)  # fmt: skip
def test_what_tensor_parallelism_cannot_run_with_is_one_line(capsys, good, tmp_path, world, extra, expected):
    line = run_preflight(capsys, world, *run_flags(good, tmp_path), "--tensor-parallel", 2, *extra)
    assert expected in line, line


@pytest.mark.parametrize(
    "stage, expected",
    [(0, "more than one tensor-parallel rank clips by the gradient norm of slice rank 0 alone"),
     (2, "ZeRO stage 2 does not run with --tensor-parallel yet")],
)  # fmt: skip
def test_zero_stages_other_than_1_are_one_line_with_tensor_parallelism(capsys, good, tmp_path, stage, expected):
    config = write_ds_config(tmp_path / "zero.json", zero_optimization={"stage": stage})
    args = [*run_flags(good, tmp_path), "--pipeline-stages", 1, "--tensor-parallel", 2, "--deepspeed_config", config]
    assert expected in run_preflight(capsys, 2, *args)


@pytest.mark.parametrize(
    "declared, extra, refused",
    [(False, [], True), (False, ["--reset-optimizer"], False), (True, [], False)],
)
def test_a_tp_checkpoint_saved_without_its_slices_declared_is_refused_in_another_layout(
    capsys, good, tmp_path, declared, extra, refused
):
    """A TP 2 checkpoint resumed as TP 1 goes through the universal conversion, which joins its slices only by the
    patterns a run saves since they were declared (the manifest says so); its weights alone always load."""
    tag = tmp_path / "checkpoints" / "step_3"
    tag.mkdir(parents=True)
    (tmp_path / "checkpoints" / LATEST).write_text("step_3")
    manifest = {"layout": layout_of(2, 1, "1f1b", tensor_parallel=2), "files": {}, "model_config": {"model_type": "x"}}
    (tag / MANIFEST).write_text(json.dumps(manifest | ({SLICES_DECLARED: True} if declared else {})))
    assert saved_layout(tag)["tensor_parallel"] == 2
    line = run_preflight(capsys, 2, *run_flags(good, tmp_path), "--load", tmp_path / "checkpoints", *extra)
    # Past this check the preflight stops at the model config (another one recorded): still one line.
    assert ("saved before its slices were declared for DeepSpeed's universal conversion" in line) == refused, line


def test_older_checkpoints_read_as_one_rank_a_layer(tmp_path):
    (tmp_path / MANIFEST).write_text(json.dumps({"layout": {"pipeline_stages": 2, "data_parallel": 1}, "files": {}}))
    assert saved_layout(tmp_path) == layout_of(2, 1, "1f1b", tensor_parallel=1)


def test_the_planner_refuses_what_the_trainer_refuses(capsys, good, monkeypatch):
    """The planner models cut layers (tests/unit/test_plan_tensor_parallel.py); what the trainer refuses with them
    (here LoRA), and a layout that does not divide the ranks, it refuses in the same one line."""
    import train.plan

    monkeypatch.setenv("DS_ACCELERATOR", "cpu")
    monkeypatch.delenv("NUM_GPUS", raising=False)  # this machine's 2 CPU ranks

    base = ["--model-config", "llama-tiny", "--deepspeed_config", str(good["config"]), "--tensor-parallel", "2"]
    for extra, expected in (
        (["--lora-rank", "4", "--pipeline-stages", "1"], "does not run with --lora-rank"),
        ([], "2 ranks (1 x 2) do not divide into 2 stages x tensor-parallel 2"),
    ):
        code = train.plan.main([*base, *extra])
        err = capsys.readouterr().err.strip().splitlines()
        assert code == 2 and len(err) == 1 and expected in err[0], err
