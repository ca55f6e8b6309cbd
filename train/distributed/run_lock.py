"""One run per output folder: an exclusive lock on `<output-dir>/.pipegpt.lock`, held by global rank 0, and no
new run over an earlier one's checkpoints.

Two runs writing one folder interleave their checkpoints (both save `step_N`), `metrics.jsonl` and
`run_config.json`, and one run's results are lost without a word. The lock is the kernel's (`flock`): it goes
with the process that holds it, on every exit, also `kill -9`, so it is never stale for the kernel. The file
also names its holder (host, pid, start time): a second run is refused with that name, and a run that finds
the name of one that ended without releasing it (killed) says that it takes the folder over. The preflight
checks the lock before any rank starts; rank 0 takes it before it writes anything into the folder.

A run that has ended leaves its checkpoints, `metrics.jsonl` and `run_config.json`; a new run into the same folder
without `--load` would overwrite them (and mix its checkpoints with the earlier ones under `--keep-last`). The
preflight and rank 0 refuse it in one line naming the three ways on: resume it, another folder, or remove the
checkpoints to start over.

`flock` holds across nodes on local and most network file systems (NFSv4, Lustre with `flock` mounted); on
one that ignores it, a second run is not refused.
"""

import fcntl
import os
import socket
import time
from pathlib import Path

from train.errors import ConfigError

LOCK_FILE = ".pipegpt.lock"
CHECKPOINTS = "checkpoints"  # <output-dir>/checkpoints: where a run saves


def _in_use(output_dir: Path, holder: str) -> ConfigError:
    return ConfigError(
        f"--output-dir {output_dir} is in use by another run ({holder or 'holder unknown'}): wait for it to end "
        "or stop it, or pass another --output-dir"
    )


class RunLock:
    """The output folder's lock, taken by `acquire` and given back by `release` (or by the process's end)."""

    def __init__(self, output_dir: Path):
        self.output_dir, self.path, self.fd = output_dir, output_dir / LOCK_FILE, None

    def acquire(self) -> str | None:
        """Take the lock; a ConfigError names the run that holds it. Returns the holder of a run that ended
        without releasing it (taken over), else None."""
        self.output_dir.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 4096, 0).decode(errors="replace").strip()
            os.close(fd)
            raise _in_use(self.output_dir, holder) from None
        previous = os.pread(fd, 4096, 0).decode(errors="replace").strip()
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"host {socket.gethostname()} pid {os.getpid()} since {time.strftime('%F %T')}\n".encode(), 0)
        self.fd = fd
        return previous or None

    def release(self) -> None:
        if self.fd is not None:
            os.ftruncate(self.fd, 0)  # a clean end: the next run has nothing to take over
            fcntl.flock(self.fd, fcntl.LOCK_UN)
            os.close(self.fd)
            self.fd = None


def check_not_in_use(output_dir: Path) -> None:
    """The preflight's check: no live run holds the folder's lock (nothing is created or changed)."""
    path = output_dir / LOCK_FILE
    if not path.is_file():
        return
    fd = os.open(path, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except BlockingIOError:
        raise _in_use(output_dir, os.pread(fd, 4096, 0).decode(errors="replace").strip()) from None
    finally:
        os.close(fd)  # also gives back the shared lock


def check_no_earlier_run(output_dir: Path, load: Path | None) -> None:
    """`output_dir` holds no checkpoint of an earlier run, unless `load` resumes from it (nothing is changed)."""
    checkpoints = output_dir / CHECKPOINTS
    tags = sorted(p.name for p in checkpoints.glob("step_*") if p.is_dir()) if checkpoints.is_dir() else []
    if not tags:
        return
    if load is not None and checkpoints.resolve() in (load.resolve(), *load.resolve().parents):
        return
    raise ConfigError(
        f"--output-dir {output_dir} holds another run's checkpoints ({', '.join(tags[-2:])}): resume it with --load "
        f"{checkpoints}, pass another --output-dir, or remove {checkpoints} to start over there"
    )
