"""The schedules' theory, replayed from DeepSpeed's own instruction streams (train/planning/schedules.py), and the
planner's per-rank view of DualPipeV."""

import json

import pytest

from models.architecture import discover
from models.presets import resolve_model_config
from tests.helpers import write_ds_config
from train.plan import main as plan_main
from train.planning.memory_model import plan_stages
from train.planning.schedules import bubble_theory, compute_streams, peak_in_flight, simulated_bubble


@pytest.mark.parametrize("ranks", [2, 3, 4])
@pytest.mark.parametrize("micro_batches", [4, 8, 16])
def test_replayed_1f1b_has_the_textbook_bubble(ranks, micro_batches):
    """Unit forwards, backwards of two, free rendezvous communication: every stage idles (p - 1)(F + B) of
    (m + p - 1)(F + B), whatever the costs (Narayanan et al. 2021)."""
    for backward_cost in (1.0, 2.0):
        for bubble in simulated_bubble("1f1b", ranks, micro_batches, backward_cost):
            assert bubble == pytest.approx((ranks - 1) / (micro_batches + ranks - 1), abs=1e-12)


@pytest.mark.parametrize("ranks", [2, 3, 4])
def test_dualpipev_bubble_is_below_1f1b_and_falls_with_micro_batches(ranks):
    counts = (2 * ranks, 4 * ranks, 8 * ranks)
    bubbles = [bubble_theory("dualpipev", ranks, m) for m in counts]
    assert all(b < bubble_theory("1f1b", ranks, m) for b, m in zip(bubbles, counts, strict=True))
    assert bubbles[0] > bubbles[1] > bubbles[2] > 0


def test_dualpipev_bubble_at_two_ranks_is_four_quarter_model_forwards():
    """2 ranks, 4 stages: each rank computes m x 2 stages x (1 + 2) and idles 4 stage-forwards, 1F1B's 6 (1 x 3
    of a half-model stage = 2 quarters): 1/7, 1/13, 1/25 at m = 4, 8, 16."""
    for m in (4, 8, 16):
        assert bubble_theory("dualpipev", 2, m) == pytest.approx(4 / (6 * m + 4), abs=1e-12)


@pytest.mark.parametrize("schedule,ranks", [("1f1b", 2), ("1f1b", 4), ("dualpipev", 2), ("dualpipev", 3)])
def test_every_rank_runs_each_micro_batch_once_per_stage(schedule, ranks):
    for stream in compute_streams(schedule, ranks, 2 * ranks):
        phases = {phase for _, phase in stream}
        assert phases == ({0, 1} if schedule == "dualpipev" else {0})
        for phase in phases:
            assert [k for k, p in stream if p == phase].count("F") == 2 * ranks
            assert [k for k, p in stream if p == phase].count("B") == 2 * ranks


def test_micro_batches_in_flight():
    """1F1B: min(p - s, m) on stage s. DualPipeV: rank 0 runs 2 x ranks forwards of its first stage before its
    first backward of it."""
    assert [peak_in_flight("1f1b", 4, 8, s, [1.0]) for s in range(4)] == [4, 3, 2, 1]
    assert [peak_in_flight("1f1b", 4, 2, s, [1.0]) for s in range(4)] == [2, 2, 2, 1]
    for ranks in (2, 3):
        assert peak_in_flight("dualpipev", ranks, 4 * ranks, 0, [1.0, 0.0]) == 2 * ranks


def test_dualpipev_plan_holds_both_ends_on_rank_0_and_the_tied_weight_once(tmp_path):
    arch = discover(resolve_model_config("gpt2-tiny", None, 8192))
    ds = json.loads(write_ds_config(tmp_path / "ds.json", train_batch=8, micro=2).read_text())
    plans = plan_stages(arch, ds, stages=2, data_parallel=1, seq_len=128, method="flops", schedule="dualpipev")
    assert [len(p.bounds) for p in plans] == [2, 2]
    assert plans[0].bounds[0][0] == 0 and plans[0].bounds[1][1] == len(arch.pipeline_layers())
    assert sum(p.parameters for p in plans) == arch.parameters()  # the tied embedding and head: one module
    one_f_one_b = plan_stages(arch, ds, stages=2, data_parallel=1, seq_len=128, method="flops")
    assert sum(p.parameters for p in one_f_one_b) > arch.parameters()  # a copy of the tied weight on each end


def test_plan_command_prints_the_dualpipev_layout_and_bubble(tmp_path, capsys):
    ds = write_ds_config(tmp_path / "ds.json", train_batch=8, micro=2)
    args = ["--model-config", "gpt2-tiny", "--schedule", "dualpipev", "--gpus-per-node", "2", "--deepspeed_config", ds]
    assert plan_main([str(a) for a in args]) == 0
    out = capsys.readouterr().out
    assert "DualPipeV schedule (two stages per rank, 4 in all)" in out
    summary = json.loads(out.strip().splitlines()[-1])
    assert summary["schedule"] == "dualpipev" and summary["bubble"] == pytest.approx(1 / 7)
    assert len(summary["rank_layer_bounds"]) == 2 and all(len(b) == 2 for b in summary["rank_layer_bounds"])
