"""A one-process command that launch.sh runs in the foreground (the preflight) ends with launch.sh and with Ctrl-C,
at once and in one line.

`python -m train.distributed.lifeline MODULE ARGS` installs both before it imports MODULE (the preflight's imports
take ~8 s of a 2-core machine): the kernel kills the process when its parent (launch.sh) dies, `kill -9`
included (Linux `prctl(PR_SET_PDEATHSIG)`), and SIGINT prints one line and exits with code 130 at once, also a
second Ctrl-C while the first is handled or while the interpreter ends (which printed a `KeyboardInterrupt`
traceback). The command writes nothing, so nothing is left half-written. Standard library only: it runs first.
"""

import ctypes
import os
import runpy
import signal
import sys

PR_SET_PDEATHSIG = 1  # <linux/prctl.h>
EXIT_INTERRUPTED = 130  # as train/errors.py (not imported: it imports torch)


def die_with_parent() -> None:
    """SIGKILL this process when its parent ends (Linux; elsewhere nothing). A parent already gone is checked after
    the call: the kernel only watches from then on."""
    parent = os.getppid()
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
    except (OSError, AttributeError):  # not Linux: no prctl
        return
    if os.getppid() != parent:
        os._exit(EXIT_INTERRUPTED)


def interrupt_at_once(signum: int, frame) -> None:
    print("error: interrupted (Ctrl-C) before training started: nothing was written", file=sys.stderr, flush=True)
    os._exit(EXIT_INTERRUPTED)


def main(argv: list[str]) -> None:
    die_with_parent()
    signal.signal(signal.SIGINT, interrupt_at_once)
    module, sys.argv = argv[0], argv
    runpy.run_module(module, run_name="__main__", alter_sys=True)


if __name__ == "__main__":
    main(sys.argv[1:])
