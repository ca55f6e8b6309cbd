"""`train.evaluate` through launch.sh: a training run's last checkpoint on its own 2 ranks, and its export imported
with --model on 1 rank, give the validation loss the run logged at those weights, and write no checkpoint."""

import json

from tests.helpers import launch, read_metrics
from train.evaluate import RESULTS_FILE

EVALUATE = {"PIPEGPT_MODULE": "train.evaluate"}


def without(args: list[str], flag: str) -> list[str]:
    at = args.index(flag)
    return args[:at] + args[at + 2 :]


def test_evaluation_without_training_equals_the_runs_own_on_two_ranks_and_one(gpt2_reference, tmp_path):
    logged = read_metrics(gpt2_reference.out)[-1]  # the last step: evaluated, checkpointed and exported
    step = logged["step"]
    checkpoint, export = gpt2_reference.out / "checkpoints" / f"step_{step}", gpt2_reference.out / "hf"
    runs = {
        "checkpoint_2_ranks": ([*gpt2_reference.args, "--load", checkpoint], 2),
        "export_1_rank": (
            [*without(gpt2_reference.args, "--model-config"), "--model", export, "--pipeline-stages", 1],
            1,
        ),
    }
    for name, (args, ranks) in runs.items():
        out = tmp_path / name
        proc = launch([*args, "--output-dir", out], ranks, env=EVALUATE)
        results = json.loads((out / RESULTS_FILE).read_text())
        assert abs(results["eval_loss"] - logged["eval_loss"]) <= 1e-6 * logged["eval_loss"], (name, results, logged)
        assert results["world_size"] == ranks and results["blocks"] == 8, results
        assert sorted(p.name for p in out.iterdir()) == [RESULTS_FILE, "tokenizer"], name  # no checkpoint, no export
        assert "evaluation: loss" in proc.stdout, proc.stdout[-2000:]
    assert not (checkpoint.parent / f"{checkpoint.name}_universal").exists()  # nothing converted beside the run
