"""One pipeline per data dir: exclusive locks, and the cleanup of a killed run.

Two lock files, both fcntl.flock (released by the kernel when the holder dies, so a
SIGKILL leaves no stale lock):

- `data_dir/launcher.lock`: held by the launcher for its whole life. A second
  launcher on the same data dir refuses before it touches anything.
- `data_dir/router.lock`: held by whichever process runs the router (the launcher's
  router child, or a Router started alone, e.g. in a test thread), from before
  journal recovery to after the last write. A standalone router cannot run beside a
  launched one, nor two launched routers (the launcher only restarts its router once
  the old one is dead).

Each holder writes its pid (and the launcher its run token) into the file, so the
one refused can name it.
"""

from __future__ import annotations

import fcntl
import glob
import os
import stat as stat_mod

import structlog

from nexus.common import blackbox, process
from nexus.common.statefile import unlink_quietly
from nexus.errors import ConfigError

log = structlog.get_logger("nexus.launch")

LAUNCHER_LOCK = "launcher.lock"
ROUTER_LOCK = "router.lock"


class DataDirLock:
    def __init__(self, data_dir: str, name: str, what: str):
        self.data_dir = data_dir
        self.path = os.path.join(data_dir, name)
        self.what = what
        self.fd: int | None = None
        self.previous = ""  # what the last holder wrote (its pid and run token)

    def acquire(self, note: str = "") -> DataDirLock:
        """Lock or raise ConfigError (exit 3) naming the holder; never blocks."""
        os.makedirs(self.data_dir, mode=0o700, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = _read(fd).split()
            os.close(fd)
            pid = holder[0] if holder else "unknown"
            raise ConfigError(
                f"{self.data_dir} is in use by another {self.what} (pid {pid}); stop it first or use another data_dir"
            ) from None
        self.previous = _read(fd)
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()} {note}".strip().encode() + b"\n", 0)
        self.fd = fd
        return self

    def release(self) -> None:
        if self.fd is not None:
            os.close(self.fd)  # closing drops the flock; the file stays (no unlink race)
            self.fd = None

    def __enter__(self) -> DataDirLock:
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()


def _read(fd: int) -> str:
    try:
        return os.pread(fd, 200, 0).decode(errors="replace").strip()
    except OSError:
        return ""


def clean_stale_run(data_dir: str, endpoints: list[str], previous_token: str) -> dict:
    """With both locks held: end what a killed previous run left behind.

    - processes of its children's process groups (pids from its black boxes), and any
      other process, that still carry its run token in their environment (so a reused
      pid is never hit; a process that cleared its environment escapes),
    - its black box files,
    - ipc socket files of our endpoints and under data_dir/run (ZeroMQ removes its
      own on a clean close; a SIGKILL leaves them).
    """
    killed: list[int] = []
    boxes = glob.glob(os.path.join(data_dir, "run", "box", "*.box"))
    if previous_token:
        for path in boxes:
            try:
                box = blackbox.BlackBox.open(path)
            except (OSError, ValueError):
                continue
            pgid = box.pid()
            box.close()
            if pgid > 1:
                killed += [p for p in process.group_members(pgid) if process.run_token(p) == previous_token]
        # and what left its group (setsid) but still carries the run's token
        killed += [p for p in process.tagged(previous_token) if p not in killed and p != os.getpid()]
        process.signal_pids(killed, 9)
    for path in boxes:
        unlink_quietly(path)
    sockets = []
    candidates = [e[len("ipc://") :] for e in endpoints if e.startswith("ipc://")]
    candidates += glob.glob(os.path.join(data_dir, "run", "*"))
    for path in dict.fromkeys(candidates):
        try:
            if stat_mod.S_ISSOCK(os.lstat(path).st_mode):
                unlink_quietly(path)
                sockets.append(os.path.basename(path))
        except OSError:
            pass
    if killed or sockets or boxes:
        log.warning("stale_run_cleaned", killed=len(killed), sockets=sockets, boxes=len(boxes))
    return {"killed": killed, "sockets": sockets, "boxes": len(boxes)}
