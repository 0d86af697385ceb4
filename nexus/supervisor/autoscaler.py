"""Autoscaling on lag: how many members a group with `workers.G.autoscale` should run.

Pure policy, no processes or sockets: the launcher feeds it one router status per tick
(at most once a second) and applies what it returns through `set_scale`, so it is tested
with plain numbers (tests/unit/test_autoscaler.py).

The policy, per group (lag per member = group lag / the members that own partitions,
min(members, partitions): a member beyond the partition count idles and takes no lag):
- up: lag per member above `target_lag` on SUSTAINED consecutive samples (one spike is
  not load) -> the count that brings it to the target, ceil(lag / target_lag), at least
  one more, capped at `max`. With no members at all (min 0), any lag wakes the group.
- down: lag per member at or under target_lag * LOW_WATER for `cooldown` -> one member
  fewer, down to `min`. One at a time: shrinking costs a drain and, if wrong, the lag
  comes back; growing late only costs latency, so it moves in one step.
- after any change: no scale-down within `cooldown`, no scale-up within cooldown *
  UP_WAIT (the new members need a moment to start and take partitions; waiting the
  full cooldown would leave a burst queued twice as long as it must).
- a count outside [min, max] (bounds changed by a reload) moves into them at once.
Anything in between (above the low-water mark, at or under the target) is steady.
"""

from __future__ import annotations

import math
from collections.abc import Container, Mapping
from dataclasses import dataclass, field

from nexus.config import AutoscaleConfig, WorkerGroupConfig

EVERY = 1.0  # seconds between samples: the launcher asks the router at most this often
SUSTAINED = 2  # consecutive samples above the target before members are added
LOW_WATER = 0.25  # of target_lag: at or under it the group is idle enough to shrink
UP_WAIT = 0.5  # of cooldown: the wait before a scale-up after any change


@dataclass(frozen=True)
class Decision:
    """Run `desired` members of `group` instead of `current`, and why."""

    group: str
    current: int
    desired: int
    lag: int
    lag_per_member: float
    reason: str

    @property
    def direction(self) -> str:
        return "up" if self.desired > self.current else "down"


@dataclass
class _Group:
    cfg: AutoscaleConfig
    partitions: int = 1 << 30  # the group's partition count (members beyond it own none)
    members: int = 0  # as last sampled
    lag: int = 0
    lag_per_member: float = 0.0
    wants: list[int] = field(default_factory=list)  # counts asked for by the current run of high samples
    low_since: float | None = None  # since when lag per member has stayed at or under the low-water mark
    last_change: float | None = None  # clock of the tick (monotonic)
    last_reason: str = ""
    up: int = 0
    down: int = 0

    def changed(self, now: float, reason: str) -> None:
        self.last_change, self.last_reason = now, reason
        self.wants.clear()  # samples before a change describe the old count
        self.low_since = None


class Autoscaler:
    def __init__(self, workers: Mapping[str, WorkerGroupConfig]):
        self.groups: dict[str, _Group] = {}
        self.next_at = 0.0
        self.configure(workers)

    def configure(self, workers: Mapping[str, WorkerGroupConfig]) -> None:
        """Take the groups' autoscale settings (at start, and on a reload): a group that
        keeps autoscaling keeps its state (cooldown, counters) under its new bounds; one
        whose count is now out of bounds is moved into them on the next tick."""
        fresh = {name: w for name, w in workers.items() if w.autoscale is not None}
        for name in list(self.groups):
            if name not in fresh:
                del self.groups[name]
        for name, spec in fresh.items():
            assert spec.autoscale is not None
            st = self.groups.setdefault(name, _Group(spec.autoscale))
            st.cfg, st.partitions = spec.autoscale, spec.partitions

    def due(self, now: float) -> bool:
        """Whether to sample now (some group autoscales and EVERY has passed); the next
        sample is then EVERY from now, answered or not."""
        if not self.groups or now < self.next_at:
            return False
        self.next_at = now + EVERY
        return True

    def observe(
        self, now: float, router_groups: Mapping[str, dict], current: Mapping[str, int], paused: Container[str] = ()
    ) -> list[Decision]:
        """One router status (its "groups") -> the changes to make. `paused` groups (given
        up on after crashes) are not scaled: more members would only crash too."""
        decisions = []
        for name in self.groups:
            lag = _lag(router_groups.get(name, {}).get("lag"))
            if lag is None or name in paused or name not in current:
                continue
            decision = self.decide(name, now, lag, current[name])
            if decision is not None:
                decisions.append(decision)
        return decisions

    def decide(self, group: str, now: float, lag: int, current: int) -> Decision | None:
        """One sample of one group; a returned decision counts as applied."""
        st = self.groups[group]
        cfg = st.cfg
        owning = min(current, st.partitions)  # members past the partition count own none
        per = lag / owning if owning else float(lag)
        st.members, st.lag, st.lag_per_member = current, lag, per
        if current < cfg.min:
            return self._change(group, st, now, cfg.min, f"below min {cfg.min}")
        if current > cfg.max:
            return self._change(group, st, now, cfg.max, f"above max {cfg.max}")
        since = now - st.last_change if st.last_change is not None else math.inf
        if per > cfg.target_lag or (current == 0 and lag > 0):
            st.low_since = None
            st.wants = [*st.wants, min(cfg.max, max(current + 1, math.ceil(lag / cfg.target_lag)))][-SUSTAINED:]
            if len(st.wants) == SUSTAINED and current < cfg.max and since >= cfg.cooldown * UP_WAIT:
                reason = f"lag per member {per:.1f} above target {cfg.target_lag:g} for {SUSTAINED} samples"
                return self._change(group, st, now, min(st.wants), reason)
            return None
        st.wants.clear()
        low = cfg.target_lag * LOW_WATER
        if per > low:
            st.low_since = None
            return None
        if st.low_since is None:
            st.low_since = now
        if current > cfg.min and now - st.low_since >= cfg.cooldown and since >= cfg.cooldown:
            reason = f"lag per member {per:.1f} at or under {low:g} for {now - st.low_since:.1f}s"
            return self._change(group, st, now, current - 1, reason)
        return None

    def _change(self, group: str, st: _Group, now: float, desired: int, reason: str) -> Decision:
        decision = Decision(group, st.members, desired, st.lag, round(st.lag_per_member, 1), reason)
        if decision.direction == "up":
            st.up += 1
        else:
            st.down += 1
        st.changed(now, reason)
        return decision

    def manual(self, group: str, n: int, now: float) -> str | None:
        """`nexus scale G N` on an autoscaled group: N within [min, max] is taken as a
        change like the autoscaler's own (the cooldown restarts from it, then the policy
        goes on from N); outside the bounds it is refused with this one line. None: fine."""
        st = self.groups.get(group)
        if st is None:
            return None
        cfg = st.cfg
        if not cfg.min <= n <= cfg.max:
            return (
                f"group {group} autoscales within [{cfg.min}, {cfg.max}]: N must be in that range "
                f"(change workers.{group}.autoscale and reload to move the bounds)"
            )
        st.changed(now, f"nexus scale {n}")
        return None

    def status(self, now: float, wall: float, running: Mapping[str, int]) -> dict:
        """The launcher status's "autoscale" key; `last_change` as Unix time, `members`
        the group's member processes running now."""
        return {
            name: {
                "min": st.cfg.min,
                "max": st.cfg.max,
                "target_lag": st.cfg.target_lag,
                "cooldown": float(st.cfg.cooldown),
                "members": running.get(name, 0),
                "lag": st.lag,
                "lag_per_member": round(st.lag_per_member, 1),
                "last_change": None if st.last_change is None else round(wall - (now - st.last_change), 3),
                "last_reason": st.last_reason,
                "decisions": {"up": st.up, "down": st.down},
            }
            for name, st in self.groups.items()
        }


def _lag(value: object) -> int | None:
    """The router's lag of a group: an int, ">=N" when only a lower bound is known (N
    then), "recovering" or absent (None: no sample)."""
    if isinstance(value, int):
        return value
    if isinstance(value, str) and value.startswith(">="):
        try:
            return int(value[2:])
        except ValueError:
            return None
    return None
