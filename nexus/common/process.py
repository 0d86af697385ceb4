"""What every child process does first (die with its parent, turn signals into a flag),
and the process-group housekeeping of the launcher (Linux /proc; elsewhere a no-op).
"""

from __future__ import annotations

import ctypes
import os
import signal
import sys
import threading
import time

PR_SET_PDEATHSIG = 1
PR_SET_CHILD_SUBREAPER = 36
RUN_ENV = "NEXUS_RUN"  # set by the launcher; every process of one run inherits it

# glibc malloc settings the launcher gives its children unless the environment sets them.
# A router or member that briefly held a backlog (a member catching up, fetches served)
# kept the freed memory in per-thread arenas: RSS stepped up ~14 MB in a 3-minute run at
# 50,000 events/s and stayed there; with two arenas and a 128 KiB trim threshold it went
# back down (docs/performance.md). Other allocators ignore these variables.
MALLOC_ENV = {"MALLOC_ARENA_MAX": "2", "MALLOC_TRIM_THRESHOLD_": "131072", "MALLOC_MMAP_THRESHOLD_": "131072"}


def _prctl(option: int, arg: int) -> bool:
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        return libc.prctl(option, arg, 0, 0, 0) == 0
    except OSError:
        return False


def die_with_parent(parent_pid: int, sig: int = signal.SIGKILL) -> None:
    """Ask the kernel to signal us when the launcher dies, so no child is orphaned.

    SIGKILL by default: a launcher that was SIGKILLed cannot coordinate a drain, and
    everything a child has acknowledged is already in the journal or its cursor.
    """
    _prctl(PR_SET_PDEATHSIG, sig)
    if parent_pid and os.getppid() != parent_pid:
        # the parent died before prctl took effect
        os._exit(1)


def become_subreaper() -> bool:
    """Orphans of our descendants (a handler's grandchild whose member died, one that
    called setsid) are re-parented to us instead of init, so we can end them."""
    return _prctl(PR_SET_CHILD_SUBREAPER, 1)


def stop_on_signals(stop: threading.Event) -> None:
    """SIGTERM/SIGINT only set the flag; the main loop does the orderly stop."""

    def handler(signum, frame):  # noqa: ARG001
        stop.set()

    signal.signal(signal.SIGTERM, handler)
    signal.signal(signal.SIGINT, handler)


# -- /proc ---------------------------------------------------------------------------
def stat(pid: int) -> tuple[str, int, int] | None:
    """(state, ppid, pgrp) of a process, None if it is gone."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            raw = f.read()
    except OSError:
        return None
    fields = raw[raw.rfind(b")") + 2 :].split()  # the name may contain spaces and ')'
    try:
        return fields[0].decode(), int(fields[1]), int(fields[2])
    except (IndexError, ValueError):
        return None


def _pids() -> list[int]:
    try:
        return [int(n) for n in os.listdir("/proc") if n.isdigit()]
    except OSError:
        return []


def live(pid: int) -> bool:
    found = stat(pid)
    return found is not None and found[0] not in ("Z", "X")


def group_members(pgid: int, exclude: int = 0) -> list[int]:
    """Live processes of process group `pgid`."""
    out = []
    for pid in _pids():
        found = stat(pid)
        if found is not None and found[2] == pgid and pid != exclude and found[0] not in ("Z", "X"):
            out.append(pid)
    return out


def children_of(ppid: int) -> list[int]:
    out = []
    for pid in _pids():
        found = stat(pid)
        if found is not None and found[1] == ppid:
            out.append(pid)
    return out


def run_token(pid: int) -> str | None:
    """The launcher run a process belongs to (RUN_ENV in its environment)."""
    try:
        with open(f"/proc/{pid}/environ", "rb") as f:
            env = f.read()
    except OSError:
        return None
    prefix = RUN_ENV.encode() + b"="
    for item in env.split(b"\0"):
        if item.startswith(prefix):
            return item[len(prefix) :].decode(errors="replace")
    return None


def tagged(token: str) -> list[int]:
    """Live processes whose environment carries this run token."""
    return [pid for pid in _pids() if run_token(pid) == token and live(pid)]


def signal_pids(pids: list[int], sig: int) -> None:
    for pid in pids:
        try:
            os.kill(pid, sig)
        except (ProcessLookupError, PermissionError):
            pass


def reap(pids: list[int]) -> None:
    """Collect the exit status of those that are our own children (no zombies)."""
    for pid in pids:
        try:
            os.waitpid(pid, os.WNOHANG)
        except ChildProcessError:
            pass


def terminate(pids: list[int], grace: float) -> None:
    """SIGTERM, then SIGKILL what is still alive after `grace` seconds."""
    if not pids:
        return
    signal_pids(pids, signal.SIGTERM)
    deadline = time.monotonic() + grace
    while True:
        reap(pids)
        pids = [p for p in pids if live(p)]
        if not pids or time.monotonic() >= deadline:
            break
        time.sleep(0.02)
    signal_pids(pids, signal.SIGKILL)
    reap(pids)


def stop_own_group(grace: float = 2.0) -> None:
    """A child stopping: end what its code forked (its process group, and its direct
    children that left the group with setsid)."""
    me = os.getpid()
    terminate(sorted(set(group_members(os.getpgrp(), exclude=me)) | set(children_of(me))), grace)


def kill_group(pgid: int) -> None:
    """SIGKILL whatever is left of a child's process group (it may be gone already)."""
    if pgid <= 1:
        return
    try:
        os.killpg(pgid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass


def raise_fd_limit() -> int:
    """Raise this process's soft limit of open files to its hard limit (no privilege
    needed); returns the soft limit now in force."""
    import resource

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard == resource.RLIM_INFINITY:
        hard = max(soft, 1 << 20)
    if soft < hard:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
            soft = hard
        except (ValueError, OSError):
            pass
    return soft
