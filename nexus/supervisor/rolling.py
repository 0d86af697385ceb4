"""A rolling restart of one worker group's members after a reload changed the group.

One member at a time: SIGTERM (it finishes its in-flight events, acks and leaves, so its
partitions move to the others with nothing lost or handled twice), wait for its exit,
spawn the replacement on the new config, wait until the router lists it as joined
(the router's status), then the next. A non-blocking state machine: the launcher's
loop calls `tick` and keeps supervising meanwhile.

What can happen during it: a member not yet restarted crashes or is scaled away: its
restart (or nothing) already runs the new config, so it is passed over. A replacement
that fails on the new config (a config error exit, say a handler whose class raises; a
crash loop) or does not join in time stops the restart there and rolls the group back:
`restore` (the reloader's) puts the group's old spec back in the launcher's config, so
every member started from then on runs it, and the members already on the new config
are restarted the same way, one at a time, on the old one. The error stays in `nexus
status` and the log (`group_rolling_restart` phase `rolled_back`).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Protocol

import structlog

from nexus.config import Config
from nexus.supervisor.children import KILL_GRACE, START_GRACE, Child, ChildState

log = structlog.get_logger("nexus.launch")

WAITING, DRAINING, JOINING, DONE = "waiting", "draining", "joining", "done"


class Members(Protocol):
    """What a rolling restart uses of the launcher (nexus/supervisor/launcher.py)."""

    cfg: Config
    children: dict[str, Child]

    def spawn(self, child: Child) -> None: ...

    def terminate(self, child: Child) -> None: ...


class RollingRestart:
    def __init__(self, group: str, members: list[str], now: float, restore: Callable[[], None] | None = None):
        self.group = group
        self.members = members  # in restart order
        self.since = now  # monotonic: a member spawned after this runs the new config already
        self.started = time.time()
        self.index = 0
        self.phase = WAITING
        self.deadline = 0.0
        self.restarted: list[str] = []
        self.passed: list[str] = []  # already on the new config, scaled away, or gone
        self.error = ""
        # on a failure: puts the group's old spec back (then members start on it); None: no rollback
        self.restore = restore
        self.rolling_back = False
        self.reverted: list[str] = []  # members restarted back on the old config
        log.info("group_rolling_restart", group=group, phase="start", members=members)

    @property
    def done(self) -> bool:
        return self.phase == DONE

    @property
    def joining(self) -> bool:
        """Waiting for the router to list the replacement (the caller fetches its status)."""
        return self.phase == JOINING

    def describe(self) -> dict:
        member = self.members[self.index] if self.index < len(self.members) else ""
        return {
            "phase": self.phase,
            "member": member if not self.done else "",
            "step": min(self.index + 1, len(self.members)),
            "of": len(self.members),
            "restarted": list(self.restarted),
            "passed": list(self.passed),
            "error": self.error,
            "rolled_back": self.rolling_back,
            "reverted": list(self.reverted),
        }

    def tick(self, launcher: Members, now: float, router_status: dict | None) -> None:
        if self.done:
            return
        name = self.members[self.index] if self.index < len(self.members) else ""
        child = launcher.children.get(name)
        if self.phase == WAITING:
            self._next(launcher, now)
        elif child is None or child.retired:  # scaled away meanwhile: nothing to restart
            self.passed.append(name)
            self._advance(launcher, now)
        elif self.phase == DRAINING:
            self._draining(launcher, child, now)
        elif self.phase == JOINING:
            self._joining(launcher, child, now, router_status)

    def _next(self, launcher: Members, now: float) -> None:
        """Start on the next member that still runs the old config."""
        while self.index < len(self.members):
            name = self.members[self.index]
            child = launcher.children.get(name)
            if child is None or child.retired or child.spawned >= self.since or child.state == ChildState.BACKOFF:
                self.passed.append(name)  # gone, or (re)starting on the new config already
                self.index += 1
                continue
            if child.state == ChildState.FAILED:
                # given up on under the old config: the new one is its new chance
                child.crashes.clear()
                launcher.spawn(child)
                self._phase(JOINING, now + self._join_timeout(launcher), name, "started")
                return
            if child.state != ChildState.RUNNING:  # stopping (a scale down), hung (being killed)
                self.passed.append(name)
                self.index += 1
                continue
            launcher.terminate(child)
            self._phase(DRAINING, now + launcher.cfg.shutdown_timeout + KILL_GRACE, name, "draining")
            return
        self.phase = DONE
        if self.rolling_back:
            log.error(
                "group_rolling_restart",
                group=self.group,
                phase="rolled_back",
                reverted=self.reverted,
                error=self.error,
                seconds=round(time.time() - self.started, 2),
            )
            return
        log.info(
            "group_rolling_restart",
            group=self.group,
            phase="done",
            restarted=self.restarted,
            passed=self.passed,
            seconds=round(time.time() - self.started, 2),
        )

    def _draining(self, launcher: Members, child: Child, now: float) -> None:
        if child.state == ChildState.STOPPED:  # drained and left (or died meanwhile)
            launcher.spawn(child)
            self._phase(JOINING, now + self._join_timeout(launcher), child.name, "started")
        elif child.state == ChildState.STOPPING and now >= self.deadline and child.process is not None:
            log.warning("process_killed", name=child.name, reason="did not drain within shutdown_timeout")
            child.process.kill()
            self.deadline = now + KILL_GRACE
        elif child.state not in (ChildState.STOPPING, ChildState.STOPPED):
            self._advance(launcher, now)  # restarted by someone else (a scale up): new config

    def _joining(self, launcher: Members, child: Child, now: float, router_status: dict | None) -> None:
        config = "old" if self.rolling_back else "new"
        if child.state == ChildState.FAILED:
            return self._fail(launcher, now, f"{child.name} failed on the {config} config ({child.last_exit})")
        if child.state == ChildState.RUNNING and router_status is not None:
            members = router_status.get("groups", {}).get(self.group, {}).get("members", [])
            if any(m.get("name") == child.name and m.get("pid") == child.pid for m in members):
                (self.reverted if self.rolling_back else self.restarted).append(child.name)
                log.info("group_rolling_restart", group=self.group, phase="step", member=child.name, state="joined")
                return self._advance(launcher, now)
        if now >= self.deadline:
            timeout = self._join_timeout(launcher)
            self._fail(launcher, now, f"{child.name} did not join the group within {timeout:g}s on the {config} config")
        # (backoff: a crash of the replacement; it restarts on the same config, still waited for)

    def _advance(self, launcher: Members, now: float) -> None:
        self.index += 1
        self.phase = WAITING
        self._next(launcher, now)

    def _phase(self, phase: str, deadline: float, name: str, state: str) -> None:
        self.phase, self.deadline = phase, deadline
        log.info(
            "group_rolling_restart",
            group=self.group,
            phase="step",
            member=name,
            state=state,
            step=f"{self.index + 1}/{len(self.members)}",
        )

    def _fail(self, launcher: Members, now: float, error: str) -> None:
        if self.rolling_back:  # the old config fails too: nothing left to go back to
            self.error += f"; the rollback failed too: {error}"
            self.phase = DONE
            log.error("group_rolling_restart", group=self.group, phase="failed", error=self.error)
            return
        if self.restore is None:
            left = self.members[self.index + 1 :]
            self.error = f"{error}; rolling restart stopped" + (
                f", {', '.join(left)} still run the old config" if left else ""
            )
            self.phase = DONE
            log.error("group_rolling_restart", group=self.group, phase="failed", error=self.error)
            return
        self.error = f"{error}; rolled back to the old config"
        log.error("group_rolling_restart", group=self.group, phase="failed", error=error, action="rolling back")
        self.restore()  # from here on, a member of the group (re)starts on the old config
        # the members on the new config: spawned since the restart began, before the restore;
        # those not running (the failed one) first: they bring a member back without a drain
        back = [
            c.name
            for c in sorted(
                launcher.children.values(), key=lambda c: (c.state == ChildState.RUNNING, len(c.name), c.name)
            )
            if c.role == "worker" and c.group == self.group and not c.retired and self.since <= c.spawned < now
        ]
        self.rolling_back, self.members, self.index, self.since = True, back, 0, now
        self.phase = WAITING
        self._next(launcher, now)

    @staticmethod
    def _join_timeout(launcher: Members) -> float:
        # a member's start (interpreter, imports, loading the handler) is given what the
        # launcher's hang detection gives it
        return max(START_GRACE, launcher.cfg.hang_timeout)
