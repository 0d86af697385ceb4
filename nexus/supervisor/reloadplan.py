"""What a reload would change: `plan(old, new)` compares two validated configs, pure.

The launcher applies the plan (nexus/supervisor/reloader.py); `nexus reload --dry-run`
prints it. A group's `partitions` count cannot change live (keys would map to other
partitions, breaking the order per key and the cursors): such a plan is refused whole.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import msgspec

from nexus.config import Config, WorkerGroupConfig, adopt_live, needs_restart

# Fields of a worker group whose change needs no member restart: `processes` is a scale,
# `start` matters only to a group without cursors, `autoscale` is the launcher's.
NO_RESTART_FIELDS = frozenset({"processes", "start", "autoscale"})
LAUNCHER_KEYS = ("restart_backoff", "crash_loop", "crash_window", "hang_timeout")
# said for every removed group (dry run too): the operator hazard is that it is for good
DROPPED = "its cursors are dropped; re-adding it starts by its `start` policy, not where it left off"


@dataclass
class GroupChange:
    group: str
    action: str  # added | removed | restart | scale | note
    fields: list[str] = field(default_factory=list)  # the changed fields (restart, scale, note)
    processes: tuple[int, int] = (0, 0)  # old, new
    routing: bool = False  # subscribe changed: the router's routing changes too

    def describe(self) -> str:
        old, new = self.processes
        if self.action == "added":
            return f"group {self.group}: added ({new} process{'es' if new != 1 else ''})"
        if self.action == "removed":
            return f"group {self.group}: removed (its {old} member(s) drain and stop); {DROPPED}"
        scale = f"; processes {old} -> {new}" if old != new else ""
        if self.action == "restart":
            what = ", ".join(f for f in self.fields if f != "processes")
            routing = " (routing changes once every member runs it)" if self.routing else ""
            return f"group {self.group}: rolling restart for {what}{routing}{scale}"
        if self.action == "scale":
            return f"group {self.group}: processes {old} -> {new}"
        return f"group {self.group}: {', '.join(self.fields)} changed (nothing to restart)"


@dataclass
class ReloadPlan:
    groups: list[GroupChange] = field(default_factory=list)
    producers: dict[str, str] = field(default_factory=dict)  # name -> added | removed | restart
    rate_limits: bool = False
    log_level: tuple[str, str] | None = None  # old, new
    launcher: list[str] = field(default_factory=list)  # supervision keys the launcher applies live
    http: str | None = None  # the HTTP port changed: its new address ("" = off)
    gateway: str | None = None  # the gateway's section changed: its address ("" = off)
    needs_restart: list[str] = field(default_factory=list)
    refused: str = ""  # one line: why nothing of this reload can apply

    @property
    def empty(self) -> bool:
        return not (
            self.groups
            or self.producers
            or self.rate_limits
            or self.log_level
            or self.launcher
            or self.http is not None
            or self.gateway is not None
        )

    def group(self, action: str) -> list[GroupChange]:
        return [g for g in self.groups if g.action == action]

    def changes(self) -> list[str]:
        """One line per change, groups first (what `nexus reload` prints)."""
        lines = [g.describe() for g in self.groups]
        lines += [f"producer {name}: {what}" for name, what in sorted(self.producers.items())]
        if self.rate_limits:
            lines.append("rate limits: applied")
        if self.log_level is not None:
            lines.append(f"log level: {self.log_level[0]} -> {self.log_level[1]}")
        lines += [f"{key}: applied" for key in self.launcher]
        if self.http is not None:
            lines.append(f"http: the HTTP process restarts {'on ' + self.http if self.http else 'off'}")
        if self.gateway is not None:
            lines.append(f"gateway: the gateway restarts {'on ' + self.gateway if self.gateway else 'off'}")
        return lines


def plan(old: Config, new: Config) -> ReloadPlan:
    """What reloading `new` over the running `old` changes (nothing is applied here)."""
    out = ReloadPlan(needs_restart=needs_restart(old, new))
    refused = [
        f"workers.{name}.partitions {spec.partitions} -> {new.workers[name].partitions}"
        for name, spec in old.workers.items()
        if name in new.workers and new.workers[name].partitions != spec.partitions
    ]
    if refused:
        out.refused = (
            f"cannot change {', '.join(refused)} live (keys would map to other partitions); "
            "nothing was applied: restore the count, or restart the pipeline"
        )
        return out
    for name in sorted(old.workers.keys() | new.workers.keys()):
        change = _group_change(name, old.workers.get(name), new.workers.get(name))
        if change is not None:
            out.groups.append(change)
    for name in sorted(old.producers.keys() | new.producers.keys()):
        if name not in new.producers:
            out.producers[name] = "removed"
        elif name not in old.producers:
            out.producers[name] = "added"
        elif old.producers[name] != new.producers[name]:
            out.producers[name] = "restart"
    out.rate_limits = old.router.rate_limits != new.router.rate_limits
    if old.log.level != new.log.level:
        out.log_level = (old.log.level, new.log.level)
    out.launcher = [key for key in LAUNCHER_KEYS if getattr(old, key) != getattr(new, key)]
    if old.http != new.http:
        out.http = new.http.listen
    if old.gateway != new.gateway:
        out.gateway = new.gateway.listen
    return out


def _group_change(name: str, old: WorkerGroupConfig | None, new: WorkerGroupConfig | None) -> GroupChange | None:
    if new is None:
        assert old is not None
        return GroupChange(name, "removed", processes=(old.processes, 0))
    if old is None:
        return GroupChange(name, "added", processes=(0, new.initial_processes()), routing=True)
    changed = [f for f in old.__struct_fields__ if getattr(old, f) != getattr(new, f)]
    if not changed:
        return None
    processes = (old.processes, new.processes)
    if set(changed) - NO_RESTART_FIELDS:
        return GroupChange(name, "restart", changed, processes, routing="subscribe" in changed)
    if "processes" in changed:
        return GroupChange(name, "scale", changed, processes)
    return GroupChange(name, "note", changed, processes)


def router_view(running: Config, target: Config, pending: set[str]) -> Config:
    """The config the router should hold while a reload is under way: `target` adopted
    live, except that the groups in `pending` keep their `running` spec (a removed group
    until its members have stopped; a restarted group, and so its routing, until every
    member runs the new config)."""
    adopted = adopt_live(running, target)
    workers = {name: spec for name, spec in adopted.workers.items() if name not in pending}
    workers.update({name: running.workers[name] for name in pending if name in running.workers})
    return msgspec.structs.replace(adopted, workers=workers)
