"""Scale-out with real ranks: two nodes on one machine, preemption, hung peers, exact resume with dropout."""

import os
import signal
import time

import pytest

from tests.helpers import (
    finish,
    free_port,
    kill_process_group,
    launch,
    rank_pids,
    read_metrics,
    small_run_args,
    start_launch,
    step_losses,
    tiny_gpt2,
    wait_for_steps,
    write_ds_config,
    write_json,
)
from train.checkpoint.manifest import latest_tag
from train.errors import EXIT_PREEMPTED

STEPS = 12
DROPOUT = tiny_gpt2(resid_pdrop=0.1, embd_pdrop=0.1, attn_pdrop=0.1)


@pytest.fixture(scope="module")
def dropout_run(corpus, tokenizer_dir, tmp_path_factory):
    """pp=2 with dropout 0.1 everywhere, uninterrupted; an evaluation (forwards that move DeepSpeed's layer
    seeds) every 3 steps and a checkpoint every 2."""
    tmp = tmp_path_factory.mktemp("dropout")
    model, ds = write_json(tmp / "model.json", DROPOUT), write_ds_config(tmp / "ds.json")
    args = small_run_args(corpus, tokenizer_dir, tmp, ds, model, STEPS, save_interval=2, eval_blocks=8)
    launch([*args, "--output-dir", tmp / "reference"], ranks=2)
    return tmp, args, step_losses(tmp / "reference")


def resume_and_compare(args: list, out, resumed_at: int, reference: dict) -> None:
    proc = launch([*args, "--output-dir", out, "--load", out / "checkpoints"], ranks=2)
    assert f"resumed from {out / 'checkpoints'} at step {resumed_at}" in proc.stdout
    after = step_losses(out)
    assert sorted(after) == list(range(1, STEPS + 1))
    for step in range(resumed_at + 1, STEPS + 1):
        assert after[step] == reference[step], (step, after[step], reference[step])  # bit-exact: torch_adam, pp=2


@pytest.fixture(scope="module")
def dropout_dualpipev_run(dropout_run):
    """The same run under DualPipeV (its own dropout masks: DeepSpeed seeds a layer from the count of the module's
    forwards, which DualPipeV calls once per phase), uninterrupted."""
    tmp, args, _ = dropout_run
    args = [*args, "--schedule", "dualpipev"]
    launch([*args, "--output-dir", tmp / "reference_dualpipev"], ranks=2)
    return tmp, args, step_losses(tmp / "reference_dualpipev")


@pytest.mark.parametrize("schedule", ["1f1b", "dualpipev"])
def test_sigkilled_run_with_dropout_resumes_bit_exactly(request, schedule):
    tmp, args, reference = request.getfixturevalue("dropout_run" if schedule == "1f1b" else "dropout_dualpipev_run")
    assert len(set(reference.values())) == STEPS
    out = tmp / f"killed_{schedule}"
    proc = start_launch([*args, "--output-dir", out], ranks=2)
    try:
        wait_for_steps(out, 5, proc)
        os.kill(rank_pids(out, 1)[0], signal.SIGKILL)
        assert finish(proc, timeout=120).returncode != 0
    finally:
        kill_process_group(proc)
    resumed_at = int(latest_tag(out / "checkpoints").removeprefix("step_"))
    assert 2 <= resumed_at < STEPS
    resume_and_compare(args, out, resumed_at, reference)


def test_sigterm_to_launch_sh_saves_the_step_reached_and_resumes_exactly(dropout_run):
    tmp, args, reference = dropout_run
    out = tmp / "preempted"
    proc = start_launch([*args, "--output-dir", out, "--save-interval", 0], ranks=2)
    wait_for_steps(out, 3, proc)
    signalled = time.monotonic()
    proc.send_signal(signal.SIGTERM)  # to launch.sh alone, as `kill` does
    done = finish(proc, timeout=60)
    seconds = time.monotonic() - signalled
    assert done.returncode == EXIT_PREEMPTED, done.stderr[-3000:]
    assert seconds < 30, f"{seconds:.1f} s from the signal to the exit: beyond DeepSpeed's grace"
    assert rank_pids(out) == [], "a rank outlived launch.sh"
    reached = max(m["step"] for m in read_metrics(out))
    assert latest_tag(out / "checkpoints") == f"step_{reached}", "the checkpoint is not at the step reached"
    assert f"stopped: SIGTERM at step {reached}: saved {out / 'checkpoints' / f'step_{reached}'} in " in done.stderr
    resume_and_compare(args, out, reached, reference)


def test_a_hung_rank_stops_its_peers_within_the_timeout_with_reports(dropout_run):
    tmp, args, _ = dropout_run
    out = tmp / "hung"
    # Saves are left to the process groups' own timeout (30 s later): only the final step saves here.
    extra = ["--dist-timeout", 8, "--train-steps", 500, "--save-interval", 0]
    proc = start_launch([*args, "--output-dir", out, *extra], ranks=2)
    try:
        wait_for_steps(out, 3, proc)
        (first,), (second,) = rank_pids(out, 0), rank_pids(out, 1)
        os.kill(second, signal.SIGSTOP)
        stopped = time.monotonic()
        while first in rank_pids(out):
            assert time.monotonic() - stopped < 8 + 15, "the other rank still waits"
            time.sleep(0.2)
        report = (out / "hang" / "rank0.txt").read_text()
    finally:
        kill_process_group(proc)
        stdout, stderr = proc.communicate()
    assert "stage 0" in report and "waiting" in report and "stacks of every thread" in report
    assert "distributed_c10d.py" in report, "the main thread's stack inside the collective is missing"
    lines = [line for line in stderr.splitlines() if line.startswith("error: rank 0: no progress")]
    assert len(lines) == 1 and f"stacks in {out / 'hang' / 'rank0.txt'}" in lines[0], stderr[-3000:]


def test_two_nodes_sharing_a_cache_tokenize_a_shard_each_and_train_the_losses_of_one_node(gpt2_layouts, tmp_path):
    """pp=2 x dp=2: node 0 holds stage 0, node 1 stage 1. The nodes share one fresh data cache: each tokenizes half of
    the corpus, rank 0 packs the halves, and the blocks (so the losses) are those of one node that did it all: the
    session's 4-rank `pp2_dp2` layout run (tests/integration/conftest.py), the same flags but the cache."""
    args = gpt2_layouts.args["pp2_dp2"]
    i = args.index("--data-cache-dir")
    args = [*args[:i], *args[i + 2 :]]  # PIPEGPT_CACHE instead
    port, nodes, shared = free_port(), [], tmp_path / "cache_shared"
    for node in (0, 1):
        env = {"NODE_RANK": str(node), "NNODES": "2", "MASTER_ADDR": "127.0.0.1", "PIPEGPT_CACHE": str(shared)}
        nodes.append(start_launch([*args, "--output-dir", tmp_path / "two"], ranks=2, env=env, port=port))
    done = [finish(node, timeout=600) for node in nodes]
    assert [d.returncode for d in done] == [0, 0], [d.stderr[-2000:] for d in done]
    shard_lines = [[line for line in d.stdout.splitlines() if "tokenized shard" in line] for d in done]
    assert [len(lines) for lines in shard_lines] == [1, 1], shard_lines
    assert "shard 1/2" in shard_lines[0][0] and "shard 2/2" in shard_lines[1][0] and "on node 1" in shard_lines[1][0]
    assert sum(d.stdout.count(" tokens in ") for d in done) == 1  # packed once, by rank 0
    left = sorted(p.name for p in (shared / "packed").iterdir())
    assert len(left) == 1 and len(left[0]) == 20, left  # the entry (its key) alone: no shards, work folders, probes
    one, two = read_metrics(gpt2_layouts.runs["pp2_dp2"]), read_metrics(tmp_path / "two")
    assert [m["step"] for m in two] == list(range(1, len(one) + 1)) and len(one) >= 4
    for a, b in zip(one, two, strict=True):
        assert b["loss"] == pytest.approx(a["loss"], rel=1e-4)
