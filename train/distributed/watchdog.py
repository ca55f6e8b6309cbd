"""Hang detection: a rank whose pipeline makes no progress for `--dist-timeout` seconds reports and stops.

A lost node ends the job within seconds (its TCP connections reset). A hung one (SIGSTOP, a stuck NIC, a
deadlocked rank) leaves its peers waiting inside a collective. Progress is marked at the start of each step of
the loop and by every pipeline instruction the engine runs (`models/deepspeed_internals.wrap_instructions`: the
forward, backward, send, receive and optimizer instructions of training and of evaluation); the rest of a step
(the step's metrics, whose memory figures are a collective) counts from the last mark. The watchdog is armed only
within a step (`watching`): the build, the checkpoint save after a step and the export are left to the process
groups' own timeout. A thread checks once a second, and when the step has gone `--dist-timeout` without a mark,
it writes this rank's last instruction with its arguments and the stacks of all its threads to
`<output-dir>/hang/rank<N>.txt`, prints one line naming the file and exits with `EXIT_HUNG`. It works alike for gloo
and NCCL (whose own timeout aborts the process without a word), because every process group's timeout is set 30 s
later (train/distributed/setup.py).
"""

import faulthandler
import os
import sys
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import torch.distributed as dist
from deepspeed.runtime.pipe.engine import PipelineEngine

from models.deepspeed_internals import wrap_instructions
from train.errors import EXIT_HUNG


class HangWatchdog:
    def __init__(self, *, engine: PipelineEngine, timeout_s: float, report_dir: Path):
        self.engine, self.timeout_s, self.report_dir, self.rank = engine, timeout_s, report_dir, dist.get_rank()
        self.armed = False
        self.step = 0
        self.doing, self.details, self.since = "start", {}, time.monotonic()
        self.done: Counter = Counter()  # instructions executed in this step, by name
        wrap_instructions(engine, self._tracked)
        threading.Thread(target=self._watch, name="pipegpt-hang-watchdog", daemon=True).start()

    def _tracked(self, name: str, fn: Callable) -> Callable:
        def run(engine, **kwargs):
            self.progress(name, kwargs)
            result = fn(engine, **kwargs)
            self.done[name] += 1
            return result

        return run

    def progress(self, doing: str, details: dict | None = None) -> None:
        self.doing, self.details, self.since = doing, details or {}, time.monotonic()

    @contextmanager
    def watching(self, step: int) -> Iterator[None]:
        """Watch one step of the loop (the checkpoint save is left to the process groups' own timeout)."""
        self.step, self.done = step, Counter()
        self.progress("step start")
        self.armed = True
        try:
            yield
        finally:
            self.armed = False

    def _watch(self) -> None:
        while True:
            time.sleep(1.0)
            if self.armed and time.monotonic() - self.since > self.timeout_s:
                self._report_and_exit()

    def _report_and_exit(self) -> None:
        waited = time.monotonic() - self.since
        passes = f"{self.done['ForwardPass']} forward and {self.done['BackwardPass']} backward passes done"
        where = f"{self.doing} {self.details}" if self.details else self.doing
        self.report_dir.mkdir(parents=True, exist_ok=True)
        report = self.report_dir / f"rank{self.rank}.txt"
        with open(report, "w") as f:
            f.write(
                f"rank {self.rank}, stage {self.engine.stage_id}, data-parallel replica "
                f"{self.engine.grid.data_parallel_id}, step {self.step}\n"
                f"waiting {waited:.0f} s in {where}, {passes} in this step (instructions done: "
                f"{dict(self.done)})\n\nstacks of every thread:\n"
            )
            f.flush()
            faulthandler.dump_traceback(file=f, all_threads=True)
        print(
            f"error: rank {self.rank}: no progress for {waited:.0f} s (--dist-timeout) in {self.doing} at step "
            f"{self.step}: a peer is lost or hung; stacks in {report}",
            file=sys.stderr,
            flush=True,
        )
        os._exit(EXIT_HUNG)  # the main thread is blocked inside a collective: nothing else can end it
