"""Bad input through launch.sh and real ranks: one clear error line, exit code 2, no rank left behind."""

import json
import os

import pytest

from tests.helpers import REPO, free_port, fresh_environ, launch, run_process_group, write_file, write_json


def test_launch_stops_before_starting_ranks(good, tmp_path):
    proc = launch(["--deepspeed_config", tmp_path / "nope.json", "--data", good["data"]], ranks=2, check=False)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines()[-1].startswith("error: cannot read DeepSpeed config")
    assert "spawned" not in proc.stdout + proc.stderr


def test_without_the_preflight_the_ranks_stop_on_bad_input_with_the_same_line(good, tmp_path):
    """PIPEGPT_SKIP_PREFLIGHT=1 (the suite's training runs): the ranks start and make the same check."""
    flags = ["--deepspeed_config", tmp_path / "nope.json", "--data", good["data"], "--output-dir", tmp_path / "run"]
    proc = launch(flags, ranks=2, check=False, preflight=False)
    errors = {line for line in (proc.stdout + proc.stderr).splitlines() if line.startswith("error: ")}
    assert proc.returncode == 2 and len(errors) == 1, proc.stderr[-3000:]
    assert errors.pop().startswith("error: cannot read DeepSpeed config") and "Traceback" not in proc.stderr
    assert "spawned" in proc.stdout + proc.stderr


def test_ranks_launched_directly_fail_together_with_one_line(good, tmp_path):
    """Without launch.sh's preflight, the ranks detect the bad column and all exit, none hangs.

    The ranks also find the lock of a JIT build of DeepSpeed's shared-memory all-reduce that never ends
    (as a killed build leaves it): CPU ranks must not build or wait for that op, training does not use it."""
    (tmp_path / "c.jsonl").write_text(json.dumps({"content": "In the beginning"}) + "\n")
    (tmp_path / "ext" / "deepspeed_shm_comm").mkdir(parents=True)
    (tmp_path / "ext" / "deepspeed_shm_comm" / "lock").touch()
    env = {
        **fresh_environ(),
        "OMP_NUM_THREADS": "1",
        "PYTHONPATH": str(REPO),
        "TORCH_EXTENSIONS_DIR": str(tmp_path / "ext"),
    }
    proc = run_process_group(
        [
            "deepspeed",
            "--num_gpus",
            "2",
            "--master_port",
            free_port(),
            "--module",
            "train.main",
            "--data",
            tmp_path / "c.jsonl",
            "--deepspeed_config",
            good["config"],
            "--output-dir",
            tmp_path / "run",
        ],
        env,
        timeout=180,
    )
    assert proc.returncode != 0
    errors = [line for line in (proc.stdout + proc.stderr).splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and "has no column 'text'" in errors[0], proc.stdout[-3000:] + proc.stderr[-3000:]


def test_corpus_smaller_than_one_global_batch_stops_every_rank(good, tmp_path):
    """Only the ranks know how many blocks the data packs into: every rank stops with the same line, no traceback."""
    (tmp_path / "small.jsonl").write_text(
        "".join(json.dumps({"text": "In the beginning God created"}) + "\n" for _ in range(40))
    )
    proc = launch(
        [
            "--data",
            tmp_path / "small.jsonl",
            "--tokenizer",
            good["tokenizer"],
            "--seq-len",
            32,
            "--deepspeed_config",
            good["config"],
            "--output-dir",
            tmp_path / "run",
            "--wandb-mode",
            "disabled",
            "--data-cache-dir",
            tmp_path / "cache",
        ],
        ranks=2,
        check=False,
        preflight=False,  # only the ranks know
    )
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error: ")]
    assert proc.returncode == 2 and len(errors) == 1, proc.stderr[-3000:]
    assert "do not fill one global batch" in errors[0] and "Traceback" not in proc.stderr
    assert not (tmp_path / "run" / "checkpoints").exists()


@pytest.mark.parametrize(
    "flag,name",
    [("--model", "runs/my-modle"), ("--tokenizer", "some-org/tok"), ("--data", "wikitext#wikitext-2-raw-v1@train")],
)
def test_hub_names_fail_within_seconds_when_the_hub_is_unreachable(good, tmp_path, flag, name):
    """Not in offline mode: the preflight asks the hub once (5 s at most) instead of the libraries' ~20 s of
    retries. This machine has no route to the hub, like a compute node without internet."""
    import subprocess
    import sys
    import time

    env = {k: v for k, v in os.environ.items() if k != "HF_HUB_OFFLINE"}
    env.update(PYTHONPATH=str(REPO), HF_HOME=str(tmp_path / "hf_home"))  # an empty cache
    start = time.perf_counter()
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "train.preflight",
            "--world-size",
            "2",
            flag,
            name,
            "--deepspeed_config",
            str(good["config"]),
            "--output-dir",
            str(tmp_path / "out"),
        ],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    seconds = time.perf_counter() - start
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error: ")]
    assert proc.returncode == 2 and len(errors) == 1, proc.stderr[-2000:]
    assert "no such local folder, and the Hugging Face Hub did not serve it" in errors[0]
    assert "Traceback" not in proc.stderr and seconds < 20, seconds  # Python start-up and imports: ~5 s here


@pytest.mark.parametrize(
    "env,expected",
    [
        ({"NUM_GPUS": "two"}, "NUM_GPUS 'two' must be a whole number"),
        ({"MASTER_PORT": "http"}, "MASTER_PORT 'http' is not a port number"),
        ({"HOSTFILE": "/nonexistent/hostfile"}, "HOSTFILE /nonexistent/hostfile does not exist"),
        ({"HOSTFILE": "BAD"}, "every line must read 'hostname slots=N'"),
        ({"MASTER_PORT": "BUSY"}, "is in use"),
        ({"NODE_RANK": "first"}, "NODE_RANK 'first' must be a whole number"),
        ({"NODE_RANK": "1"}, "MASTER_ADDR is not"),
        ({"NODE_RANK": "0", "MASTER_ADDR": "127.0.0.1"}, "give NNODES"),
        ({"NODE_RANK": "2", "MASTER_ADDR": "127.0.0.1", "NNODES": "2"}, "the hostfile has 2 nodes"),
    ],
    ids=[
        "env-num-gpus",
        "env-master-port-type",
        "env-hostfile-missing",
        "env-hostfile-malformed",
        "env-master-port-in-use",
        "env-node-rank-type",
        "env-node-rank-without-master-addr",
        "env-node-rank-without-nodes",
        "env-node-rank-out-of-range",
    ],
)
def test_launcher_environment_rows(good, tmp_path, env, expected):
    import socket

    env = dict(env)
    if env.get("HOSTFILE") == "BAD":
        env["HOSTFILE"] = str(write_file(tmp_path / "hosts", "node0 slots=2\nnode1\n"))
    with socket.socket() as busy:
        busy.bind(("", 0))
        busy.listen()
        if env.get("MASTER_PORT") == "BUSY":
            env["MASTER_PORT"] = str(busy.getsockname()[1])
        proc = launch(
            ["--deepspeed_config", good["config"], "--data", good["data"], "--output-dir", tmp_path / "out"],
            ranks=2,
            check=False,
            env=env,
        )
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error: ")]
    assert proc.returncode == 2 and len(errors) == 1 and expected in errors[0], proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr and "spawned" not in proc.stdout + proc.stderr


def test_an_exception_with_an_empty_message_is_one_line_not_a_traceback(good, corpus, tokenizer_dir, tmp_path):
    """A library that fails with a bare `assert` (an empty message) while the ranks load a checkpoint or the
    pretrained weights: one `error:` line naming what was loaded, exit 2, no traceback (the model config:
    test_bad_input.py::test_an_empty_message_while_the_model_config_loads_is_one_line)."""
    from transformers import GPT2Config, GPT2LMHeadModel

    from tests.helpers import small_run_args, tiny_gpt2

    model_config = write_json(tmp_path / "tiny.json", tiny_gpt2(layers=2, width=32, heads=2))
    args = small_run_args(corpus, tokenizer_dir, tmp_path, good["config"], model_config, 2, pipeline_stages=1)
    launch([*args, "--output-dir", tmp_path / "run"], ranks=1)
    hf_dir = tmp_path / "hf"
    GPT2LMHeadModel(GPT2Config(**tiny_gpt2(layers=2, width=32, heads=2), vocab_size=512)).save_pretrained(hf_dir)
    cases = {
        "checkpoint": (
            ["--load", tmp_path / "run" / "checkpoints", "--train-steps", 4],
            "error: cannot load checkpoint ",
        ),
        "model": (["--model", hf_dir], f"error: cannot load --model {hf_dir}: OSError"),
    }
    for point, (extra, expected) in cases.items():
        flags = small_run_args(corpus, tokenizer_dir, tmp_path, good["config"], model_config, 2, pipeline_stages=1)
        flags = [*flags, "--output-dir", tmp_path / point, *[str(a) for a in extra if a is not None]]
        if point == "model":
            flags = flags[: flags.index("--model-config")] + flags[flags.index("--model-config") + 2 :]
        proc = launch(flags, ranks=1, check=False, env={"PIPEGPT_FAULT": f"empty-error:{point}"}, preflight=False)
        output = proc.stdout + proc.stderr
        errors = [line for line in output.splitlines() if line.startswith("error:")]
        assert proc.returncode == 2, (point, output[-3000:])
        assert len(errors) == 1 and errors[0].startswith(expected), (point, errors)
        assert "Traceback" not in output, point
        if point == "checkpoint":
            assert errors[0].endswith(": AssertionError"), errors


def test_launch_help_prints_the_flags_once(good):
    proc = launch(["--help"], ranks=2, check=False)
    assert proc.returncode == 0 and proc.stdout.count("usage: pipegpt") == 1
    assert "spawned" not in proc.stdout + proc.stderr
