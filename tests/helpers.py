"""Helpers for tests that launch real ranks."""

import json
import os
import socket
import subprocess
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def write_ds_config(path: Path, train_batch: int = 8, micro: int = 2, **overrides) -> Path:
    config = {
        "train_batch_size": train_batch,
        "train_micro_batch_size_per_gpu": micro,
        "optimizer": {"type": "AdamW", "params": {"lr": 3e-3, "weight_decay": 0.1, "torch_adam": True}},
        "scheduler": {
            "type": "WarmupCosineLR",
            "params": {"total_num_steps": "auto", "warmup_num_steps": 2, "warmup_type": "linear"},
        },
        "gradient_clipping": 1.0,
        "zero_optimization": {"stage": 1},
        "steps_per_print": 10**9,
    }
    config.update(overrides)
    path.write_text(json.dumps(config))
    return path


def launch(args: list, ranks: int, check: bool = True, timeout: int = 600, env: dict | None = None
           ) -> subprocess.CompletedProcess:  # fmt: skip
    """`launch.sh ARGS` with `ranks` CPU ranks: real processes, real gloo collectives."""
    env = {**os.environ, "NUM_GPUS": str(ranks), "MASTER_PORT": str(free_port()), "OMP_NUM_THREADS": "1", **(env or {})}
    proc = subprocess.run(
        [str(REPO / "launch.sh"), *map(str, args)], cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout
    )
    if check and proc.returncode != 0:
        raise AssertionError(f"launch.sh failed ({proc.returncode}):\n{proc.stdout[-4000:]}\n{proc.stderr[-4000:]}")
    return proc


def read_metrics(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
