"""`nexus reload` and SIGHUP in the launcher: apply a changed config to the running pipeline.

`reload()` validates the file, plans the change (nexus/supervisor/reloadplan.py) and
starts applying it; what takes time (draining the members of a removed group, rolling
restarts, producer restarts) goes on from `tick`, called by the launcher's loop, so the
launcher keeps supervising meanwhile. One reload at a time: another one while this one
runs is refused with one line (a dry run is always answered).

Order, so that nothing is lost: the router learns added groups before their members
start, and forgets removed groups only after their members drained and stopped; a
restarted group's routing changes once all its members run the new config (the router
is handed a "view": the new config with those groups still at their old spec). The
launcher adopts the new config at once, so every child it (re)starts from then on runs
it; what only a restart can apply stays as it was and is reported.
"""

from __future__ import annotations

import functools
import os
import time
from typing import Protocol

import msgspec
import structlog

from nexus import config as config_mod
from nexus.common import logs
from nexus.common.statefile import unlink_quietly
from nexus.config import Config, WorkerGroupConfig
from nexus.errors import ConfigError, NexusError, PeerError
from nexus.gateway import listen as gateway_listen
from nexus.http import credential as http_credential
from nexus.http import listen as http_listen
from nexus.protocol import curve
from nexus.protocol.client import CoordClient
from nexus.supervisor import importcheck
from nexus.supervisor.autoscaler import Autoscaler
from nexus.supervisor.children import Child, ChildState
from nexus.supervisor.crashes import CrashBook
from nexus.supervisor.reloadplan import ReloadPlan, plan, router_view
from nexus.supervisor.rolling import RollingRestart

log = structlog.get_logger("nexus.launch")

STATUS_EVERY = 0.2  # seconds between the router status requests while a replacement joins
PUSH_RETRY = 1.0  # seconds before the router is asked again to take the new view
# the first view may add an `earliest` group, which the router reads the journal for
# before it answers (nexus/router/livegroups.py): waited for, the launcher loop paused
FIRST_PUSH_TIMEOUT = 30.0


class Launcher(Protocol):
    """What the reloader uses of the launcher (nexus/supervisor/launcher.py)."""

    cfg: Config
    env: str | None
    token: str
    children: dict[str, Child]
    scale: dict[str, int]
    failed_groups: dict[str, str]
    crashbook: CrashBook
    autoscaler: Autoscaler
    starting: bool
    stopping: bool
    curve: curve.ClientKeys | None

    def spawn(self, child: Child) -> None: ...

    def terminate(self, child: Child) -> None: ...

    def add_child(self, name: str, role: str, group: str = "") -> Child: ...

    def set_scale(self, group: str, n: int, manual: bool = True) -> dict: ...

    def router_status(self, timeout: float) -> dict | None: ...


class Reloader:
    def __init__(self, launcher: Launcher):
        self.launcher = launcher
        self.running: Config | None = None  # the config when the reload under way started
        self.rolls: dict[str, RollingRestart] = {}
        self.scaled: dict[str, tuple[int, int]] = {}  # a restarted group's member count: before, set by the reload
        self.removing_groups: set[str] = set()
        self.removing_children: set[str] = set()  # producers (and the http process) stopping for good
        self.restarting_children: set[str] = set()  # ... and stopping to start again on the new config
        self.pushed: Config | None = None  # the view the router holds
        self.push_at = 0.0
        self.status_at = 0.0
        self.router_status: dict | None = None
        self.last: dict | None = None  # the last reload, for `nexus status`

    # -- a reload ------------------------------------------------------------------------
    @property
    def busy(self) -> bool:
        return self.running is not None

    def reload(self, dry_run: bool = False) -> dict:
        """The control reply: what applied (or would apply) and what needs a restart."""
        launcher = self.launcher
        if launcher.starting:
            return self._refused("the pipeline is still starting; reload once it runs", dry_run)
        if self.busy and not dry_run:
            return self._refused(f"a reload is in progress ({self._progress()}); try again when it is done", False)
        router = launcher.children.get("router")
        if not dry_run and (router is None or router.state != ChildState.RUNNING):
            state = router.state if router is not None else "missing"
            return self._refused(f"the router is not running ({state}); nothing changed, try again", False)
        try:
            fresh = config_mod.load(launcher.cfg.source, launcher.env)
        except ConfigError as exc:
            return self._refused(str(exc), dry_run)
        found = plan(launcher.cfg, fresh)
        if found.refused:
            return self._refused(found.refused, dry_run)
        # members about to start on a new or changed group: their handler must import, or
        # the reload is refused before any member is touched (a subprocess, up to 20 s)
        starting = [g.group for g in found.groups if g.action in ("added", "restart")]
        if error := importcheck.check(config_mod.adopt_live(launcher.cfg, fresh), starting):
            return self._refused(f"{error}; nothing was applied", dry_run)
        if found.http is not None and (error := _http_refused(launcher.cfg, fresh)):
            return self._refused(f"{error}; nothing was applied", dry_run)
        if found.gateway is not None and (error := _gateway_refused(launcher.cfg, fresh)):
            return self._refused(f"{error}; nothing was applied", dry_run)
        if dry_run:
            return {"ok": True, "dry_run": True, "changes": found.changes(), "needs_restart": found.needs_restart}
        return self._start(found, fresh)

    def _restart_http(self, target: Config) -> None:
        """The HTTP port changed: its process ends and starts again on the new address and
        token (it only reports: nothing of the pipeline waits on it)."""
        if target.http.listen:
            http_credential.prepare(target)  # the token file, when the config sets none
        self._restart_service("http", bool(target.http.listen))

    def _restart_gateway(self, target: Config) -> None:
        """The gateway's section changed (address, TLS, tokens file, limits): its process
        ends (settling what is in flight; the rest waits in its ledger) and starts again."""
        self._restart_service("gateway", bool(target.gateway.listen))

    def _restart_service(self, name: str, on: bool) -> None:
        """One of the single service processes (its child name is its role): restarted on
        the new config, or started or stopped when it was turned on or off."""
        launcher = self.launcher
        child = launcher.children.get(name)
        if child is not None and child.alive():
            child.retired = not on
            launcher.terminate(child)
            (self.removing_children if child.retired else self.restarting_children).add(name)
        elif on:
            launcher.add_child(name, name)

    def _refused(self, error: str, dry_run: bool) -> dict:
        if not dry_run:
            log.error("reload_failed", error=error)
            if not self.busy:  # (refused for being busy: the status keeps showing the one under way)
                self.last = {"last": time.time(), "ok": False, "error": error, "changes": [], "in_progress": False}
        return {"ok": False, "error": error}

    def _start(self, found: ReloadPlan, fresh: Config) -> dict:
        launcher = self.launcher
        running = launcher.cfg
        target = config_mod.adopt_live(running, fresh)
        pending = {g.group for g in found.groups if g.action in ("removed", "restart")}
        view = router_view(running, target, pending)
        try:
            answer = self._tell_router(view, timeout=FIRST_PUSH_TIMEOUT)
        except NexusError as exc:
            return self._refused(str(exc), False)
        self.pushed = view
        # from here on every child (re)started runs the new config
        launcher.cfg = target
        launcher.crashbook.cfg = target
        self.running = running
        now = time.monotonic()
        if found.log_level is not None:
            self._set_log_level(found.log_level[1])
        for change in found.groups:
            name = change.group
            if change.action == "removed":
                self._remove_group(name)
            elif change.action == "added":
                launcher.scale[name] = 0
                launcher.set_scale(name, target.workers[name].initial_processes(), manual=False)
            before = launcher.scale.get(name, 0)
            if change.action in ("restart", "scale"):
                want = _wanted(target.workers[name], change.processes, before)
                if want != before:
                    launcher.set_scale(name, want, manual=False)
            if change.action == "restart":
                launcher.failed_groups.pop(name, None)  # its failed members get a new chance too
                members = [f"{name}-{i}" for i in range(min(before, launcher.scale[name]))]
                self.scaled[name] = (before, launcher.scale[name])
                self.rolls[name] = RollingRestart(
                    name,
                    [m for m in members if m in launcher.children],
                    now,
                    restore=functools.partial(self._restore_group, name),
                )
        # new bounds apply from the next sample; a group keeps its cooldown and counters
        launcher.autoscaler.configure(target.workers)
        if found.http is not None:
            self._restart_http(target)
        if found.gateway is not None:
            self._restart_gateway(target)
        for name, what in found.producers.items():
            child = launcher.children.get(name)
            if what == "added":
                launcher.add_child(name, "producer")
            elif child is not None and what == "removed":
                child.retired = True
                launcher.terminate(child)
                self.removing_children.add(name)
            elif child is not None and what == "restart":
                launcher.terminate(child)
                self.restarting_children.add(name)
        changes = found.changes()
        self.last = {
            "last": time.time(),
            "ok": True,
            "changes": changes,
            "needs_restart": found.needs_restart,
            "in_progress": True,
        }
        log.info("reload_applied", changes=changes, needs_restart=found.needs_restart)
        self.tick(now)  # what is done at once (nothing to wait for) ends here
        return {
            "ok": True,
            "changes": changes,
            "needs_restart": found.needs_restart,
            "rate_limits": answer.get("rate_limits", {}),
            "in_progress": self.busy,
            "rolling": sorted(self.rolls),
        }

    def _remove_group(self, name: str) -> None:
        """Its members drain (finish, ack, leave) and stop; the router forgets the group
        once they are gone (tick)."""
        launcher = self.launcher
        launcher.scale[name] = 0
        for child in launcher.children.values():
            if child.role == "worker" and child.group == name and not child.retired:
                child.retired = True
                launcher.terminate(child)
        self.removing_groups.add(name)

    def _restore_group(self, name: str) -> None:
        """A restarted group's replacement failed on the new config: the group's old spec
        goes back into the launcher's config (members started from now on run it, and the
        router's view keeps it) with its bounds and member count from before the reload."""
        launcher = self.launcher
        assert self.running is not None
        old = self.running.workers[name]
        launcher.cfg = msgspec.structs.replace(launcher.cfg, workers={**launcher.cfg.workers, name: old})
        launcher.crashbook.cfg = launcher.cfg
        launcher.autoscaler.configure(launcher.cfg.workers)
        launcher.failed_groups.pop(name, None)  # its members given up on get the old config
        before, set_to = self.scaled.get(name, (0, 0))
        if launcher.scale.get(name) == set_to != before:  # the reload's scale, unless changed since
            launcher.set_scale(name, before, manual=False)
        log.warning("reload_group_restored", group=name, reason="a member failed on the new config")

    def _set_log_level(self, level: str) -> None:
        """Every process: this one now; each child through the level file and a signal
        (nexus/common/logs.py: LEVEL_SIGNAL); children started later get it in the config."""
        launcher = self.launcher
        logs.set_level(level)
        try:
            logs.write_level_file(launcher.cfg.data_dir, level, launcher.token)
        except OSError as exc:
            log.error("log_level_not_applied", error=str(exc), reason="cannot write the level file")
            return
        for child in launcher.children.values():
            if child.alive() and child.pid:
                try:
                    os.kill(child.pid, logs.LEVEL_SIGNAL)
                except ProcessLookupError:
                    pass
        log.info("log_level_changed", level=level)

    def _tell_router(self, view: Config, timeout: float) -> dict:
        """Hand the router its view; NexusError with one line when it refuses or is silent."""
        launcher = self.launcher
        try:
            answer = CoordClient(launcher.cfg.coord, timeout, curve=launcher.curve).reload(config_mod.to_bytes(view))
        except PeerError:
            raise NexusError(f"router at {launcher.cfg.coord} did not answer; nothing changed") from None
        if "error" in answer:
            raise NexusError(answer["error"])
        return answer

    def router_start_config(self) -> Config | None:
        """The config to start a router with now (it restarted during a reload): the view
        the router is meant to hold, which the new process then holds from its start;
        None when no reload is under way (the launcher's own config)."""
        if self.running is None:
            return None
        self.pushed = router_view(self.running, self.launcher.cfg, self._pending())
        return self.pushed

    def _pending(self) -> set[str]:
        """The groups the router keeps at their running spec: draining, or restarting."""
        return self.removing_groups | {name for name, r in self.rolls.items() if not r.done}

    # -- from the launcher's loop ----------------------------------------------------------
    def tick(self, now: float) -> None:
        launcher = self.launcher
        if self.running is None or launcher.stopping:
            return
        children = launcher.children
        for name in list(self.removing_groups):
            members = [c for c in children.values() if c.role == "worker" and c.group == name]
            if not any(c.alive() for c in members):
                for child in members:
                    _forget(children, child)
                launcher.scale.pop(name, None)
                launcher.failed_groups.pop(name, None)
                self.removing_groups.discard(name)
        for name in list(self.removing_children):
            producer = children.get(name)
            if producer is None or not producer.alive():
                if producer is not None:
                    _forget(children, producer)
                self.removing_children.discard(name)
        for name in list(self.restarting_children):
            producer = children.get(name)
            if producer is None or producer.state != ChildState.STOPPING:
                if producer is not None and producer.state == ChildState.STOPPED:
                    launcher.spawn(producer)
                self.restarting_children.discard(name)
        rolls = [r for r in self.rolls.values() if not r.done]
        if any(r.joining for r in rolls) and now >= self.status_at:
            self.status_at = now + STATUS_EVERY
            self.router_status = launcher.router_status(STATUS_EVERY)
        for roll in rolls:
            roll.tick(launcher, now, self.router_status)
        self.router_status = None if not any(r.joining for r in rolls) else self.router_status
        pending = self._pending()
        view = router_view(self.running, launcher.cfg, pending)
        if view != self.pushed and now >= self.push_at:
            try:
                self._tell_router(view, timeout=1.0)
                self.pushed = view
            except NexusError as exc:  # restarting, say: asked again shortly
                self.push_at = now + PUSH_RETRY
                log.warning("reload_router_view_pending", error=str(exc))
        if not (pending or self.removing_children or self.restarting_children) and view == self.pushed:
            self._finish()

    def _finish(self) -> None:
        errors = [f"group {name}: {r.error}" for name, r in sorted(self.rolls.items()) if r.error]
        assert self.last is not None
        self.last.update(
            ok=not errors,
            in_progress=False,
            finished=time.time(),
            rolling={name: r.describe() for name, r in self.rolls.items()},
        )
        if errors:
            self.last["error"] = "; ".join(errors)
        log.info("reload_finished", ok=not errors, seconds=round(time.time() - self.last["last"], 2), errors=errors)
        self.running = None
        self.rolls = {}
        self.scaled = {}

    # -- status ------------------------------------------------------------------------------
    def _progress(self) -> str:
        parts = [
            f"{'rollback' if r.rolling_back else 'rolling restart'} of {name}: "
            f"{r.describe()['member']} {r.describe()['step']}/{len(r.members)}"
            for name, r in self.rolls.items()
            if not r.done
        ]
        parts += [f"group {name} draining" for name in sorted(self.removing_groups)]
        parts += [f"{name} stopping" for name in sorted(self.removing_children | self.restarting_children)]
        return "; ".join(parts) or "finishing"

    def status(self) -> dict | None:
        """The launcher status' "reload": the last reload and, while it runs, its progress."""
        if self.last is None:
            return None
        out = dict(self.last)
        if self.busy:
            out["rolling"] = {name: r.describe() for name, r in self.rolls.items()}
            out["progress"] = self._progress()
            errors = [f"group {name}: {r.error}" for name, r in sorted(self.rolls.items()) if r.error]
            if errors:
                out["ok"], out["error"] = False, "; ".join(errors)
        return out


def _forget(children: dict[str, Child], child: Child) -> None:
    """A child of a removed group or producer, ended: out of the table, its box deleted."""
    if child.box is not None:
        child.box.close()
        unlink_quietly(child.box.path)
        child.box = None
    children.pop(child.name, None)


def _wanted(spec: WorkerGroupConfig, processes: tuple[int, int], current: int) -> int:
    """A changed group's member count: an autoscaled one keeps what the autoscaler chose,
    moved into its (maybe new) bounds; otherwise a changed `processes` applies and an
    unchanged one keeps the count `nexus scale` may have set."""
    if spec.autoscale is not None:
        return min(max(current, spec.autoscale.min), spec.autoscale.max)
    old, new = processes
    return new if old != new else current


def _http_refused(running: Config, fresh: Config) -> str:
    """A new HTTP address must be well formed, protected off loopback and free (the
    address the running HTTP process holds is not probed); "" when it may apply."""
    if not fresh.http.listen:
        return ""
    try:
        http_listen.check(fresh.http, bind=fresh.http.listen != running.http.listen)
    except ConfigError as exc:
        return str(exc)
    return ""


def _gateway_refused(running: Config, fresh: Config) -> str:
    """As _http_refused, for the gateway (its TLS files are loaded too)."""
    if not fresh.gateway.listen:
        return ""
    try:
        gateway_listen.check(fresh, bind=fresh.gateway.listen != running.gateway.listen)
    except ConfigError as exc:
        return str(exc)
    return ""
