"""`--streaming` over real ranks: the same per-step losses as the cached blocks read in order (pp=2 x
dp=2), and a streaming run SIGKILLed after a checkpoint resumes bit for bit."""

import itertools

import pytest

from tests.helpers import (
    kill_one_rank_after_first_checkpoint,
    launch,
    read_metrics,
    small_run_args,
    step_losses,
    tiny_gpt2,
    write_ds_config,
    write_json,
)
from train.checkpoint.manifest import latest_tag

STEPS = 10


@pytest.fixture(scope="module")
def setup(corpus, tokenizer_dir, tmp_path_factory):
    """The corpus' first 3,000 verses train, the next 300 validate (--val-data: the cached run holds out nothing
    of the training source, as the stream does not)."""
    tmp = tmp_path_factory.mktemp("streaming")
    lines = open(corpus).readlines()
    (tmp / "train.jsonl").write_text("".join(lines[:3000]))
    (tmp / "val.jsonl").write_text("".join(itertools.islice(lines, 3000, 3300)))
    model, ds = write_json(tmp / "model.json", tiny_gpt2()), write_ds_config(tmp / "ds.json")
    args = small_run_args(
        tmp / "train.jsonl",
        tokenizer_dir,
        tmp,
        ds,
        model,
        STEPS,
        val_data=tmp / "val.jsonl",
        val_fraction=None,  # --val-data is the validation: a --val-fraction would have no effect (refused)
        eval_interval=5,
        eval_blocks=16,
        save_interval=4,
        keep_last=0,
        sample_tokens=0,
    )
    return tmp, [str(a) for a in args]


@pytest.fixture(scope="module")
def streamed(setup):
    """Uninterrupted streaming runs, by rank count (also the reference of the killed run)."""
    tmp, args = setup
    runs = {}

    def run(ranks: int):
        if ranks not in runs:
            runs[ranks] = tmp / f"streamed_{ranks}"
            proc = launch([*args, "--streaming", "--output-dir", runs[ranks]], ranks=ranks)
            assert "data: streaming 1 source(s)" in proc.stdout
        return runs[ranks]

    return run


def test_streaming_trains_the_losses_of_the_cache_read_in_order(setup, streamed):
    """pp=2 x dp=2: each replica reads its share of the stream (one replica is the same path with one share)."""
    tmp, args = setup
    ranks = 4
    cached = tmp / f"cached_{ranks}"
    launch([*args, "--data-order", "sequential", "--output-dir", cached], ranks=ranks)
    streamed = streamed(ranks)
    a, b = step_losses(cached), step_losses(streamed)
    assert sorted(a) == sorted(b) == list(range(1, STEPS + 1))
    for step in a:
        assert b[step] == pytest.approx(a[step], rel=1e-6), step
    val = [[m["eval_loss"] for m in read_metrics(out) if "eval_loss" in m] for out in (cached, streamed)]
    assert len(val[0]) == 2 and val[1] == pytest.approx(val[0], rel=1e-6)


def test_a_sigkilled_streaming_run_resumes_bit_for_bit(setup, streamed):
    tmp, args = setup
    args = [*args, "--streaming"]
    reference, killed = streamed(2), tmp / "stream_killed"
    kill_one_rank_after_first_checkpoint(args, 2, killed)
    resumed_at = int(latest_tag(killed / "checkpoints").removeprefix("step_"))
    assert resumed_at < STEPS, "the rank was killed only after the run had finished"
    proc = launch([*args, "--output-dir", killed, "--load", killed / "checkpoints"], ranks=2)
    assert f"at step {resumed_at}" in proc.stdout and "stream starts" not in proc.stdout
    before, after = step_losses(reference), step_losses(killed)
    assert sorted(after) == list(range(1, STEPS + 1))
    assert [after[s] for s in range(resumed_at + 1, STEPS + 1)] == [before[s] for s in range(resumed_at + 1, STEPS + 1)]
