"""The launcher's view of one child process: state, restarts, last exit, hang check,
and the cleanup of what it forked once it has exited."""

from __future__ import annotations

import os
from collections.abc import Iterable
from dataclasses import dataclass, field
from enum import StrEnum
from multiprocessing.process import BaseProcess

import structlog

from nexus.common import blackbox, process

log = structlog.get_logger("nexus.launch")

HANG_WATCHED = ("router", "worker")  # the roles that beat their box (producers do not yet)
START_GRACE = 60.0  # a child whose own loop has not beaten yet (interpreter start, imports,
# loading a handler) is hung only after this long, or hang_timeout if longer
KILL_GRACE = 2.0  # a hung child gets SIGTERM, then SIGKILL this much later


class ChildState(StrEnum):
    """Where a child is in its life; the value is what `nexus status` shows."""

    NEW = "new"  # not started yet
    RUNNING = "running"
    HUNG = "hung"  # silent past hang_timeout: SIGTERM sent, SIGKILL at kill_at
    BACKOFF = "backoff"  # exited; restarts at restart_at
    STOPPING = "stopping"  # asked to stop (shutdown, scale down)
    STOPPED = "stopped"  # ended on purpose: not restarted
    FAILED = "failed"  # crash loop or config error: not restarted until fixed


@dataclass
class Child:
    name: str
    role: str
    group: str = ""
    process: BaseProcess | None = None
    state: ChildState = ChildState.NEW
    restarts: int = 0
    started: float = 0.0
    spawned: float = 0.0  # monotonic: the start grace counts from here
    first_beat: float = 0.0  # the beat child.py writes at start; until the child's own loop
    # beats again it is starting (imports, recovery): START_GRACE
    crashes: list[float] = field(default_factory=list)
    restart_at: float = 0.0
    kill_at: float = 0.0  # hung: SIGKILL at this monotonic time
    retired: bool = False  # scaled away: do not restart
    reaped: bool = True  # its exit was handled (its process group ended)
    last_exit: str = ""  # "exit 1", "SIGKILL", "hung", "recycled"
    box: blackbox.BlackBox | None = None  # what the child last beat and was handling

    @property
    def pid(self) -> int | None:
        return self.process.pid if self.process is not None else None

    def alive(self) -> bool:
        return self.process is not None and self.process.is_alive()

    def silent(self, now: float, timeout: float) -> float | None:
        """Seconds without a beat when that means a hang, else None."""
        if self.role not in HANG_WATCHED or self.box is None:
            return None
        beat = self.box.last_beat()
        if beat and not self.first_beat:
            self.first_beat = beat  # the beat child.py writes at start
        if beat and beat != self.first_beat:
            silence, limit = now - beat, timeout
        else:
            silence, limit = now - self.spawned, max(timeout, START_GRACE)
        return silence if silence > limit else None

    def end_group(self) -> bool:
        """The child has exited (its sentinel fired): end what is left of its process
        group while its zombie still holds the pid (so the group id cannot have been
        reused), then reap it. False if that was done already."""
        if self.reaped:
            return False  # long gone: its pid may belong to someone else by now
        process.kill_group(self.pid or 0)
        if self.process is not None:
            self.process.join(0.5)
        self.reaped = True
        return True


def end_orphans(children: Iterable[Child], keep: Iterable[int] = ()) -> None:
    """Our direct children that are neither our processes (`children`, and `keep`: the
    embedded nats-server) nor the multiprocessing helper (which stays in our process
    group) are descendants' orphans (the launcher is a subreaper): end them, unless their
    group's child still lives."""
    children = list(children)
    ours = {c.pid for c in children if c.process is not None} | set(keep)
    live_groups = {c.pid for c in children if c.alive()}
    my_group = os.getpgrp()
    orphans = []
    for pid in process.children_of(os.getpid()):
        found = process.stat(pid)
        if pid in ours or found is None or found[2] in (my_group, *live_groups):
            continue
        orphans.append(pid)
    if orphans:
        log.warning("orphans_killed", pids=orphans)
        process.terminate(orphans, 0.0)
