"""Nothing silently wrong, nothing lost, over real ranks: one run per folder, a resume is the same run, full disks,
honest exit codes after signals, and ranks that stop when launch.sh is killed."""

import json
import os
import signal
import subprocess
import threading
import time
from contextlib import contextmanager
from pathlib import Path

import pytest

from tests.helpers import (
    finish,
    kill_process_group,
    launch,
    rank_pids,
    read_metrics,
    run_preflight,
    small_run_args,
    start_launch,
    tiny_gpt2,
    wait_for_steps,
    write_ds_config,
    write_json,
)
from train.checkpoint.manifest import latest_tag, read_manifest, verified_tag_dir, verify_contents
from train.data.tokenizer import train_bpe_tokenizer
from train.errors import EXIT_ERROR, EXIT_PREEMPTED, EXIT_UNEXPECTED


@pytest.fixture(scope="module")
def base(corpus, tokenizer_dir, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("faults")
    model, ds = write_json(tmp / "model.json", tiny_gpt2()), write_ds_config(tmp / "ds.json")
    args = small_run_args(corpus, tokenizer_dir, tmp, ds, model, 200, eval_interval=10**6, sample_tokens=0)
    return tmp, [str(a) for a in args]


def error_lines(proc: subprocess.CompletedProcess) -> list[str]:
    output = proc.stdout + proc.stderr
    assert "Traceback" not in output, output[-3000:]
    return [line for line in output.splitlines() if line.startswith("error:")]


def with_flag(args: list[str], flag: str, value) -> list[str]:
    """`args` with `flag` set to `value` (replaced if present)."""
    if flag in args:
        i = args.index(flag)
        return [*args[:i], flag, str(value), *args[i + 2 :]]
    return [*args, flag, str(value)]


def test_a_second_run_into_a_folder_in_use_is_refused_and_a_dead_runs_lock_taken_over(base):
    tmp, args = base
    out = tmp / "shared"
    endless = with_flag(args, "--train-steps", 10**6)  # stopped below: it must still run when the second starts
    first = start_launch([*endless, "--output-dir", out, "--seed", 1, "--save-interval", 5], ranks=2)
    try:
        wait_for_steps(out, 3, first)
        second = launch([*args, "--output-dir", out, "--seed", 2, "--train-steps", 6], ranks=2, check=False)
        (line,) = error_lines(second)
        assert second.returncode == EXIT_ERROR and "is in use by another run (host " in line and " pid " in line
        assert rank_pids(out) and first.poll() is None, "the first run was disturbed"
        wait_for_steps(out, 8, first)
        os.killpg(first.pid, signal.SIGKILL)  # the whole first run dies at once: its lock file stays, unlocked
        first.wait()
    finally:
        kill_process_group(first)
    assert json.loads((out / "run_config.json").read_text())["args"]["seed"] == 1  # the first run's record, alone
    steps = [m["step"] for m in read_metrics(out)]
    assert steps == list(range(1, len(steps) + 1)) and len(steps) >= 8
    resumed_at = int(latest_tag(out / "checkpoints").removeprefix("step_"))
    more = with_flag(with_flag(args, "--train-steps", resumed_at + 2), "--seed", 1)  # the first run's data order
    taken = launch([*more, "--output-dir", out, "--load", out / "checkpoints"], ranks=2)
    assert "taking over" in taken.stdout and "ended without releasing it" in taken.stdout
    assert not (out / ".pipegpt.lock").read_text().strip(), "a finished run leaves its lock released"


def test_a_resume_is_the_same_run(base, corpus, tmp_path, capsys):
    tmp, args = base
    short = with_flag(args, "--train-steps", 4)
    launch([*short, "--output-dir", tmp_path / "a", "--save-interval", 2], ranks=2)
    checkpoints = tmp_path / "a" / "checkpoints"
    # Another tokenizer: refused, naming the flag.
    other = train_bpe_tokenizer(iter([["an unrelated corpus of other words"] * 50]), 300, tmp_path / "other")
    assert len(other) < 512
    proc = launch([*with_flag(short, "--tokenizer", tmp_path / "other"), "--output-dir", tmp_path / "b",
                   "--load", checkpoints, "--train-steps", 6], ranks=2, check=False)  # fmt: skip
    (line,) = set(error_lines(proc))
    assert proc.returncode == EXIT_ERROR and "is not the tokenizer the checkpoint was trained with" in line
    assert "drop --tokenizer" in line
    # Another block length: refused by launch.sh's preflight, before any rank starts (checked here in-process).
    line = run_preflight(capsys, 2, *with_flag(short, "--seq-len", 16), "--output-dir", tmp_path / "c", "--load",
                         checkpoints, "--train-steps", 6)  # fmt: skip
    assert "--seq-len 32, not 16" in line and not (tmp_path / "c").exists()
    # No --tokenizer: the checkpoint's own, never a BPE trained on the new run's data.
    i = short.index("--tokenizer")
    no_tokenizer = [*short[:i], *short[i + 2 :]]
    proc = launch([*no_tokenizer, "--output-dir", tmp_path / "d", "--load", checkpoints, "--train-steps", 6], ranks=2)
    assert "training a byte-level BPE" not in proc.stdout + proc.stderr
    saved = (checkpoints / "step_4" / "tokenizer" / "tokenizer.json").read_text()
    assert (tmp_path / "d" / "tokenizer" / "tokenizer.json").read_text() == saved
    assert [m["step"] for m in read_metrics(tmp_path / "d")][-1] == 6


@contextmanager
def small_file_system(path: Path, megabytes: float):
    """A tmpfs of `megabytes` at `path` (root, as CI and this project's machines run)."""
    path.mkdir(parents=True)
    subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={int(megabytes * 1024)}k", "tmpfs", path], check=True)
    try:
        yield path
    finally:
        subprocess.run(["umount", "-l", path], check=False)


def test_full_disks_stop_the_run_with_one_line_and_lose_no_checkpoint(base, gpt2_reference, tmp_path):
    """Sized by the session's reference run: the same model, DeepSpeed config and tokenizer, so the same files."""
    tmp, args = base
    short = [*with_flag(args, "--train-steps", 6), "--save-interval", 2, "--keep-last", 0]
    tag = gpt2_reference.out / "checkpoints" / "step_5"
    size = sum(p.stat().st_size for p in tag.rglob("*") if p.is_file()) / 2**20
    other = sum(p.stat().st_size for p in (gpt2_reference.out / "tokenizer").rglob("*") if p.is_file()) / 2**20
    # Room for one checkpoint, not two: the second save is refused before it writes anything.
    with small_file_system(tmp_path / "one", other + size * 1.6 + 0.5) as disk:
        proc = launch([*short, "--output-dir", disk / "run"], ranks=2, check=False, preflight=False)
        (line,) = set(error_lines(proc))
        assert proc.returncode == EXIT_ERROR and "not enough space for checkpoint" in line and "step_2" in line
        assert latest_tag(disk / "run" / "checkpoints") == "step_2"
        assert [p.name for p in (disk / "run" / "checkpoints").glob("step_*")] == ["step_2"]  # nothing partial
        verify_contents(verified_tag_dir(disk / "run" / "checkpoints"))
    # Room for less than one: the save fails while writing, its partial folder is removed.
    with small_file_system(tmp_path / "none", other + size * 0.5 + 0.3) as disk:
        proc = launch([*short, "--output-dir", disk / "run"], ranks=2, check=False, preflight=False)
        lines = set(error_lines(proc))
        assert proc.returncode == EXIT_ERROR and len(lines) == 1, lines
        assert "writing checkpoint" in lines.pop() and not (disk / "run" / "checkpoints" / "step_2").exists()
        assert latest_tag(disk / "run" / "checkpoints") is None
        assert rank_pids(disk / "run") == []


@contextmanager
def training(args: list[str], out: Path):
    """A run into `out` that has logged 3 steps (saving only when it stops), killed as a group afterwards."""
    proc = start_launch([*args, "--output-dir", out, "--save-interval", 0], ranks=2)
    try:
        wait_for_steps(out, 3, proc)
        yield proc
    finally:
        kill_process_group(proc)
    assert verified_tag_dir(out / "checkpoints").name == f"step_{max(m['step'] for m in read_metrics(out))}"


def test_two_ctrl_c_save_the_step_reached_and_exit_143(base):
    tmp, args = base
    out = tmp / "interrupted"
    with training(args, out) as proc:
        os.killpg(proc.pid, signal.SIGINT)  # as a terminal sends Ctrl-C: to the whole foreground group
        time.sleep(0.3)
        os.killpg(proc.pid, signal.SIGINT)
        done = finish(proc, timeout=90)
    assert done.returncode == EXIT_PREEMPTED, (done.returncode, done.stderr[-3000:])
    reached = max(m["step"] for m in read_metrics(out))
    tag = verified_tag_dir(out / "checkpoints")
    assert tag.name == f"step_{reached}" and read_manifest(tag)["step"] == reached
    verify_contents(tag)
    assert rank_pids(out) == []


def test_ranks_stop_saving_when_launch_sh_is_killed(base):
    tmp, args = base
    out = tmp / "orphaned"
    with training(args, out) as proc:
        os.kill(proc.pid, signal.SIGKILL)  # launch.sh alone: the runner, its launcher and the ranks lose their parent
        killed = time.monotonic()
        for pipe in (proc.stdout, proc.stderr):  # keep reading what the ranks print, as a terminal would
            threading.Thread(target=pipe.read, daemon=True).start()
        while rank_pids(out):
            assert time.monotonic() - killed < 30, "the ranks outlived launch.sh"
            time.sleep(0.2)


def live_processes_of_group(pgid: int) -> list[int]:
    """The processes of a process group that have not ended (zombies left to be reaped do not count)."""
    found = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[2]) == pgid and fields[0] != "Z":
            found.append(int(stat.parent.name))
    return found


def test_kill_9_of_launch_sh_while_the_data_is_prepared_leaves_no_process(base):
    """PIPEGPT_FAULT=stall:prepare-data holds rank 0 inside the data preparation (rank 1 waits for it), as a long
    tokenization does; then launch.sh alone is killed with -9. Every process of the launch ends within seconds,
    rank 0 says why in one line, nothing was saved."""
    tmp, args = base
    out = tmp / "killed_while_preparing"
    proc = start_launch([*args, "--output-dir", out], ranks=2, env={"PIPEGPT_FAULT": "stall:prepare-data"})
    stalled, seen = threading.Event(), []

    def read_stdout() -> None:
        for line in proc.stdout:
            seen.append(line)
            if "fault: stalling at prepare-data" in line:
                stalled.set()

    threading.Thread(target=read_stdout, daemon=True).start()
    try:
        assert stalled.wait(timeout=180), "".join(seen)[-3000:]
        os.kill(proc.pid, signal.SIGKILL)
        killed = time.monotonic()
        while live_processes_of_group(proc.pid):
            assert time.monotonic() - killed < 15, f"processes outlived launch.sh: {live_processes_of_group(proc.pid)}"
            time.sleep(0.2)
    finally:
        kill_process_group(proc)
    stderr = proc.stderr.read()
    assert "Traceback" not in stderr + "".join(seen), stderr[-3000:]
    # Each rank that says why says it in one line and names what reached it first: the end of launch.sh, or the
    # SIGTERM of DeepSpeed's launcher ending the ranks once another rank stopped on it. A rank waiting for the other
    # in a collective names the end of launch.sh too, not the collective's lost peer (gloo: "Connection closed by
    # peer"), which it may see first.
    lines = [line for line in stderr.splitlines() if line.startswith("error:")]
    allowed = {
        f"error: {why} before training started: stopped, nothing was saved"
        for why in (f"the end of launch.sh (pid {proc.pid})", "SIGTERM")
    }
    assert 1 <= len(lines) <= 2 and set(lines) <= allowed, lines
    assert not (out / "checkpoints").exists()


def test_unexpected_failure_on_rank_zero_during_data_preparation_stops_every_rank(corpus, tokenizer_dir, tmp_path):
    """PIPEGPT_FAULT=prepare-data: rank 0 raises a RuntimeError while the other rank waits for the data."""
    (tmp_path / "model.json").write_text('{"model_type": "gpt2", "n_layer": 2, "n_embd": 32, "n_head": 2}')
    args = small_run_args(
        corpus, tokenizer_dir, tmp_path, write_ds_config(tmp_path / "ds.json"), tmp_path / "model.json", 2
    )
    out = tmp_path / "run"
    proc = launch(
        [*args, "--output-dir", out], ranks=2, check=False, env={"PIPEGPT_FAULT": "prepare-data"}, preflight=False
    )
    assert proc.returncode == EXIT_UNEXPECTED, proc.stderr[-2000:]
    errors = [line for line in (proc.stdout + proc.stderr).splitlines() if "error:" in line]
    assert errors == [
        f"error: RuntimeError: fault injected by PIPEGPT_FAULT=prepare-data (traceback in {out / 'error.log'})"
    ]
    log = (out / "error.log").read_text()
    assert "--- rank 0" in log and "Traceback (most recent call last)" in log and "prepare_data" in log
    assert "Traceback" not in proc.stdout + proc.stderr
    assert not (out / "checkpoints").exists()
