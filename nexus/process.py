"""What every child process does first: die with its parent, turn signals into a flag."""
from __future__ import annotations

import ctypes
import os
import signal
import sys
import threading

PR_SET_PDEATHSIG = 1


def die_with_parent(parent_pid: int, sig: int = signal.SIGKILL) -> None:
    """Ask the kernel to signal us when the launcher dies, so no child is orphaned.

    SIGKILL by default: a launcher that was SIGKILLed cannot coordinate a drain, and
    everything a child has acknowledged is already in the journal or its cursor.
    """
    if sys.platform.startswith("linux"):
        try:
            libc = ctypes.CDLL(None, use_errno=True)
            libc.prctl(PR_SET_PDEATHSIG, sig, 0, 0, 0)
        except OSError:
            pass
    if parent_pid and os.getppid() != parent_pid:
        # the parent died before prctl took effect
        os._exit(1)


def stop_on_signals(stop: threading.Event) -> None:
    """SIGTERM/SIGINT only set the flag; the main loop does the orderly stop."""

    def handler(signum, frame):  # noqa: ARG001
        stop.set()

    signal.signal(signal.SIGTERM, handler)
    signal.signal(signal.SIGINT, handler)
