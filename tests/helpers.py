"""Helpers for tests that launch real ranks."""

import json
import os
import signal
import subprocess
import time
from pathlib import Path

from bench.fixtures import (  # noqa: F401 (shared with the benchmarks, imported from here by the tests)
    CHATML,
    QUIET_RUN,
    chat_records,
    cli,
    deepspeed_command,
    ds_config,
    free_port,
    tiny_gpt2,
    tiny_llama,
    write_file,
    write_json,
)
from train.checkpoint.manifest import latest_tag

REPO = Path(__file__).resolve().parent.parent


def write_ds_config(path: Path, train_batch: int = 8, micro: int = 2, **overrides) -> Path:
    return write_json(path, ds_config(train_batch, micro, **overrides))


def small_run_args(
    corpus: Path,
    tokenizer_dir: Path,
    tmp_path: Path,
    ds_config: Path,
    model_config: Path | str,
    steps: int,
    **overrides,
) -> list[str]:
    """Flags of a short run on the test corpus: 32-token blocks, a loss every step, an evaluation every 3 steps
    (`overrides`: other flags, as for `cli`)."""
    flags = dict(
        data=corpus,
        tokenizer=tokenizer_dir,
        model_config=model_config,
        seq_len=32,
        train_steps=steps,
        log_interval=1,
        eval_interval=3,
        val_fraction=0.05,
        eval_blocks=32,
        deepspeed_config=ds_config,
        data_cache_dir=tmp_path / "cache",
        wandb_mode="disabled",
        sample_tokens=5,
    )
    return cli(**{**flags, **overrides})


def run_preflight(capsys, world_size: int, *args) -> str:
    """launch.sh's one-process check in this process, expected to refuse: its one `error:` line (exit code 2).
    What launch.sh does with that line (stops before any rank) is tested once, by launching it."""
    from train.preflight import main as preflight

    capsys.readouterr()  # only what the preflight prints
    code = preflight(["--world-size", str(world_size), *map(str, args)])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2, err
    assert len(err) == 1 and err[0].startswith("error: "), err
    return err[0]


def start_process_group(cmd: list, env: dict, output: int = subprocess.PIPE) -> subprocess.Popen:
    """Start `cmd` (a launcher and its ranks) in its own process group, not waited for; its output piped (or
    `output`: DEVNULL for a run nobody reads). Each start is a line in $PIPEGPT_LAUNCH_LOG (tests/run.sh counts
    them)."""
    if os.environ.get("PIPEGPT_FAST_TIER"):
        raise AssertionError("this test starts ranks or launch.sh: it belongs in tests/integration")
    if os.environ.get("PIPEGPT_LAUNCH_LOG"):
        with open(os.environ["PIPEGPT_LAUNCH_LOG"], "a") as log:
            log.write(" ".join(str(c) for c in cmd[:3]) + "\n")
    return subprocess.Popen(
        [str(c) for c in cmd],
        cwd=REPO,
        env=env,
        stdout=output,
        stderr=output,
        stdin=subprocess.DEVNULL,
        text=True,
        start_new_session=True,
    )


def finish(proc: subprocess.Popen, timeout: int = 600) -> subprocess.CompletedProcess:
    """Wait for a process group started here; on timeout kill the whole group (so that no orphaned rank holds a
    port, a lock or a core while the next tests run) and fail."""
    try:
        stdout, stderr = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        kill_process_group(proc)
        stdout, stderr = proc.communicate()
        raise AssertionError(f"still running after {timeout} s:\n{stdout[-3000:]}\n{stderr[-3000:]}") from None
    return subprocess.CompletedProcess(proc.args, proc.returncode, stdout, stderr)


def run_process_group(cmd: list, env: dict, timeout: int) -> subprocess.CompletedProcess:
    return finish(start_process_group(cmd, env), timeout)


def fresh_environ() -> dict[str, str]:
    """This process's environment less the variables of its own one-rank group (the `one_rank_group` fixture sets
    them): a launch starts a new world."""
    return {k: v for k, v in os.environ.items() if k not in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR")}


def launch_env(ranks: int, port: int | None = None, preflight: bool = False) -> dict:
    """The environment of `launch.sh` with `ranks` CPU ranks. Without `preflight`, launch.sh's one-process check
    is skipped (PIPEGPT_SKIP_PREFLIGHT=1, ~8 s a launch): the ranks make the same checks, and a run expected to
    train is not stopped by it. Tests of bad input keep it: it is what they test."""
    return {
        **fresh_environ(),
        "NUM_GPUS": str(ranks),
        "MASTER_PORT": str(port or free_port()),
        "OMP_NUM_THREADS": "1",
        "PIPEGPT_SKIP_PREFLIGHT": "0" if preflight else "1",
    }


def start_launch(
    args: list,
    ranks: int,
    env: dict | None = None,
    port: int | None = None,
    preflight: bool = False,
    output: int = subprocess.PIPE,
) -> subprocess.Popen:
    """`launch.sh ARGS` with `ranks` CPU ranks, started in its own process group, not waited for."""
    env = {**launch_env(ranks, port, preflight), **(env or {})}
    return start_process_group([REPO / "launch.sh", *args], env, output)


def rank_pids(out: Path, local_rank: int | None = None) -> list[int]:
    """The trainer processes (ranks) of the run writing to `out`, or the one of `local_rank`."""
    which = "[0-9]+" if local_rank is None else str(local_rank)
    found = subprocess.run(["pgrep", "-f", f"train.main --local_rank={which} .*{out}"], capture_output=True, text=True)
    return [int(pid) for pid in found.stdout.split()]


def wait_for_steps(out: Path, steps: int, proc: subprocess.Popen, timeout: float = 300) -> None:
    """Until `out/metrics.jsonl` has `steps` logged steps (the run must still be going)."""
    deadline = time.time() + timeout
    while not (out / "metrics.jsonl").exists() or len((out / "metrics.jsonl").read_text().splitlines()) < steps:
        assert proc.poll() is None, f"the run ended early:\n{proc.stderr.read()[-3000:] if proc.stderr else ''}"
        assert time.time() < deadline, f"no {steps} steps after {timeout} s"
        time.sleep(0.05)


def kill_process_group(proc: subprocess.Popen) -> None:
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass


def launch(
    args: list,
    ranks: int,
    check: bool = True,
    timeout: int = 600,
    env: dict | None = None,
    preflight: bool | None = None,
) -> subprocess.CompletedProcess:
    """`launch.sh ARGS` with `ranks` CPU ranks: real processes, real gloo collectives. The preflight runs where
    the launch may fail (`check=False`) unless `preflight` says otherwise (see `launch_env`)."""
    proc = finish(start_launch(args, ranks, env, preflight=not check if preflight is None else preflight), timeout)
    if check and proc.returncode != 0:
        raise AssertionError(f"launch.sh failed ({proc.returncode}):\n{proc.stdout[-4000:]}\n{proc.stderr[-4000:]}")
    return proc


def read_metrics(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def step_losses(run_dir: Path) -> dict[int, float]:
    """{step: loss} of the run's metrics.jsonl."""
    return {m["step"]: m["loss"] for m in read_metrics(run_dir)}


def read_wandb_offline_run(run_dir: Path) -> tuple[dict, list[dict], list[str]]:
    """(config, history rows, table keys) of the offline W&B run under `run_dir/wandb`.

    Reads the run's transaction log (`run-<id>.wandb`: a 7-byte header, then 32 KiB blocks of
    records, each with a 7-byte header: CRC, length, type full/first/middle/last) and decodes
    each record with wandb's own protobuf classes. wandb 0.31 ships no public offline reader.
    """
    import struct

    from wandb.proto import wandb_internal_pb2

    (log,) = (run_dir / "wandb").glob("offline-run-*/run-*.wandb")
    data, pos, block, chunks, records = log.read_bytes(), 7, 32768, b"", []
    while pos + 7 <= len(data):
        if block - pos % block < 7:
            pos += block - pos % block
            continue
        _, length, kind = struct.unpack("<IHB", data[pos : pos + 7])
        chunk, pos = data[pos + 7 : pos + 7 + length], pos + 7 + length
        if kind in (1, 4):
            records.append(chunks + chunk)
            chunks = b""
        elif kind in (2, 3):
            chunks += chunk
    config, history, tables = {}, [], set()
    for raw in records:
        record = wandb_internal_pb2.Record()
        record.ParseFromString(raw)
        kind = record.WhichOneof("record_type")
        if kind == "run":
            config.update({i.key: json.loads(i.value_json) for i in record.run.config.update})
        elif kind == "config":
            config.update({i.key: json.loads(i.value_json) for i in record.config.update})
        elif kind == "history":
            row = {i.key or ".".join(i.nested_key): json.loads(i.value_json) for i in record.history.item}
            tables |= {k.removesuffix("._type") for k, v in row.items() if k.endswith("._type") and v == "table-file"}
            history.append(row)
    return config, history, sorted(tables)


def kill_one_rank_after_first_checkpoint(args: list[str], ranks: int, out) -> None:
    """launch.sh ARGS; once the first checkpoint is complete, SIGKILL the last rank, as a lost node."""
    proc = start_launch([*args, "--output-dir", out], ranks, output=subprocess.DEVNULL)
    try:
        deadline = time.time() + 300
        while latest_tag(out / "checkpoints") is None:
            assert proc.poll() is None and time.time() < deadline, "the run ended before its first checkpoint"
            time.sleep(0.02)
        victim = rank_pids(out, ranks - 1)
        assert victim, "rank process not found"
        os.kill(victim[0], signal.SIGKILL)
        assert proc.wait(timeout=120) != 0
    finally:
        kill_process_group(proc)


def train_blocks(corpus: Path, tokenizer_dir: Path, cache_dir: Path, split: str = "train"):
    """The training blocks `small_run_args` runs read (the same cache), indexed as `--trace-batches` records them
    (`split="validation"`: the blocks their evaluations read)."""
    from train.data.examples import TEXT
    from train.data.sources import resolve_sources
    from train.data.splits import packed_dataset
    from train.data.tokenizer import load_tokenizer

    tokenizer = load_tokenizer(str(tokenizer_dir))
    sources = resolve_sources([str(corpus)])
    return packed_dataset(sources, TEXT, tokenizer, seq_len=32, val_fraction=0.05, cache_dir=cache_dir)[split]


def replay_by_hand(model, groups: list[dict], run: Path, blocks, steps: int) -> list[float]:
    """`model` (a transformers or peft model) trained by hand on the blocks `run`'s first stage recorded
    (`--trace-batches`), as `ds_config()` trains: torch's AdamW (lr 3e-3, weight decay 0.1 unless a group says
    otherwise), DeepSpeed's own WarmupCosineLR class, clipping at 1.0, the mean over micro-batches. Per-step losses."""
    import torch
    from deepspeed.runtime.lr_schedules import WarmupCosineLR

    params = [p for group in groups for p in group["params"]]
    optimizer = torch.optim.AdamW(groups, lr=3e-3, weight_decay=0.1)
    schedule = WarmupCosineLR(optimizer, total_num_steps=steps, warmup_num_steps=2, warmup_type="linear")
    trace = [json.loads(line) for line in (run / "batches" / "stage0_dp0.jsonl").read_text().splitlines()]
    losses = []
    for step in range(1, steps + 1):
        micro_batches = [record["blocks"] for record in trace if record["step"] == step]
        step_losses = []
        for indices in micro_batches:
            ids = torch.stack([blocks[i]["input_ids"] for i in indices]).long()
            loss = model(ids, labels=ids).loss
            (loss / len(micro_batches)).backward()
            step_losses.append(loss.item())
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        schedule.step()
        optimizer.zero_grad()
        losses.append(sum(step_losses) / len(step_losses))
    return losses
