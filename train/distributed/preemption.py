"""Preemption: SIGTERM (a scheduler's, a user's `kill`, launch.sh forwarding its own) or SIGINT stops the run
at the next step boundary with a complete checkpoint. So does the end of `launch.sh` itself (`kill -9` of it
leaves DeepSpeed's runner, its per-node launcher and the ranks running with no parent to stop them): each rank
watches the pid launch.sh exports (`PIPEGPT_LAUNCHER_PID`, on the host it names) once a second.

Before training starts (resolving the config, preparing the data, building the engine) there is nothing to save:
a signal or the end of launch.sh stops the rank at once, with one line from global rank 0 and exit code
`EXIT_INTERRUPTED` (130), which local rank 0 leaves for launch.sh; `datasets`' worker processes end with it (their
pipes close). A cache entry being written is a temporary folder until it is complete, never trusted half-written
(train/data/packing.py: write_entry), and the next preparation removes what a killed one left.

Once training runs (`arm`), a signal only sets a flag; after every step the ranks agree (one all-reduce of a
scalar) whether any of them got one, so that they stop together at the same step, save it through the crash-safe
path and exit with `EXIT_PREEMPTED`. DeepSpeed's launcher gives its ranks 30 s after forwarding a signal before it
kills them (`terminate_process_tree` in deepspeed/launcher/launch.py, 0.19.8); a step and a save must fit in that.
"""

import os
import signal
import socket
import sys
import threading
import time
from pathlib import Path

import torch
import torch.distributed as dist
from deepspeed.accelerator import get_accelerator

from train.errors import EXIT_INTERRUPTED, EXIT_PREEMPTED, RunError


class Preempted(RunError):
    """The run stopped on a signal after saving the step it reached."""

    exit_code = EXIT_PREEMPTED
    label = "stopped"


def process_alive(pid: int) -> bool:
    """Whether `pid` runs: a killed process its parent has not reaped yet (a zombie, state Z) has ended too."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's: alive (a recycled pid cannot be told apart)
        return True
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):  # no /proc (not Linux): kill(pid, 0) is all there is
        return True


def launcher_ended(pid: int) -> str:
    """The cause a rank names when launch.sh is gone."""
    return f"the end of launch.sh (pid {pid})"


def record_exit_code(code: int) -> None:
    """Local rank 0 writes its exit code where launch.sh reads it (`PIPEGPT_STATUS_FILE`): DeepSpeed 0.19.8's
    runner exits 0 when its per-node launcher ends on a signal (runner.py: only a positive return code is passed
    on), which made a preempted run look finished."""
    path = os.environ.get("PIPEGPT_STATUS_FILE")
    if path and os.environ.get("LOCAL_RANK", "0") == "0":
        try:
            Path(path).write_text(f"{code}\n")
        except OSError:
            pass


class Preemption:
    """Installed first thing on every rank; `arm` once training starts."""

    def __init__(self) -> None:
        self.signal_name: str | None = None
        self.armed = False
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, self._on_signal)
        launcher = os.environ.get("PIPEGPT_LAUNCHER_PID")
        self.launcher = None
        if launcher and os.environ.get("PIPEGPT_LAUNCHER_HOST") == socket.gethostname():
            self.launcher = int(launcher)
            threading.Thread(target=self._watch_launcher, args=(self.launcher,), daemon=True).start()

    def arm(self) -> None:
        """From here on a signal stops the run at a step boundary, saved."""
        self.armed = True
        if self.signal_name:  # one came while the engine was built: no step yet to save
            self._stop_now(self.signal_name)

    def _stop_now(self, why: str) -> None:
        if os.environ.get("RANK", "0") == "0":
            print(f"error: {why} before training started: stopped, nothing was saved", file=sys.stderr, flush=True)
        record_exit_code(EXIT_INTERRUPTED)
        os._exit(EXIT_INTERRUPTED)

    def _watch_launcher(self, pid: int) -> None:
        while process_alive(pid):
            time.sleep(1.0)
        self.signal_name = launcher_ended(pid)
        if not self.armed:
            self._stop_now(self.signal_name)
        print(f"warning: launch.sh (pid {pid}) is gone: stopping at the end of this step", flush=True)

    def stop_if_ended(self) -> None:
        """After a failure before training: when launch.sh is gone, or a signal came, that is the cause (most often
        a collective whose peer already stopped on it, which gloo reports as "Connection closed by peer" before
        this rank's once-a-second watch sees it): stop as for it. Otherwise return, and the failure is reported."""
        if self.launcher is not None and not process_alive(self.launcher):
            self.signal_name = self.signal_name or launcher_ended(self.launcher)
        if self.signal_name and not self.armed:
            self._stop_now(self.signal_name)

    def _on_signal(self, signum: int, frame) -> None:
        self.signal_name = signal.Signals(signum).name
        if not self.armed:
            self._stop_now(self.signal_name)

    def requested(self) -> bool:
        """Whether any rank got a signal (a collective: every rank calls it after every step)."""
        flag = torch.tensor([1.0 if self.signal_name else 0.0], device=get_accelerator().current_device_name())
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        return bool(flag.item())

    def stop(self, step: int, checkpoint: Path, save_seconds: float) -> Preempted:
        return Preempted(
            f"{self.signal_name or 'a signal on another rank'} at step {step}: saved {checkpoint} in "
            f"{save_seconds:.1f} s; resume with --load {checkpoint.parent}"
        )
