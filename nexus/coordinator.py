"""Group membership, partition assignment and cursors (no sockets: the router
feeds it messages and sends what it returns).

A partition that moves between two live members is first revoked from the old
owner, which finishes its in-flight events, acks and reports `released`; only then
is it granted to the new owner with the cursor. So adding or removing members
without crashes neither loses nor repeats an event. A member that dies (missed
heartbeats, or `leave`) frees its partitions at once: the next owner starts from
the durable cursor, which is at-least-once.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import structlog

from .wire import Assign, Coord

log = structlog.get_logger("nexus.coordinator")

Outgoing = list[tuple[bytes, Coord]]


@dataclass
class MemberInfo:
    name: str
    identity: bytes
    last_seen: float
    joined: float
    host: str = ""
    pid: int = 0
    view: tuple[int, ...] = ()           # partitions the member was last told to run


@dataclass
class Group:
    name: str
    partitions: int
    cursors: list[int]
    members: dict[str, MemberInfo] = field(default_factory=dict)
    owner: list[str | None] = field(default_factory=list)     # who holds the partition now
    target: list[str | None] = field(default_factory=list)    # who should hold it
    revoked_at: dict[int, float] = field(default_factory=dict)
    # partitions whose last owner may have handled events it never acked (it died,
    # or the router restarted): the next owner sees those events as redelivered
    unclean: set[int] = field(default_factory=set)
    # dead-lettered poison (events that killed or hung members): partition -> seqs every
    # next owner passes over (Assign.skip), until the cursor is past them
    skip: dict[int, set[int]] = field(default_factory=dict)
    # partition -> events <= this may have been handled by a member that died: flagged as
    # redelivered for every owner until the cursor passes it (a grant moved on gracefully
    # before its owner got to them keeps the flag)
    flag_upto: dict[int, int] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.owner = [None] * self.partitions
        self.target = [None] * self.partitions


def balanced(partitions: int, members: list[str], current: list[str | None]) -> list[str | None]:
    """Sticky balanced assignment: keep partitions where they are, within quota."""
    if not members:
        return [None] * partitions
    members = sorted(members)
    base, extra = divmod(partitions, len(members))
    # the +1 quotas go to the members holding most now, so as little as possible moves
    held = {m: sum(1 for h in current if h == m) for m in members}
    by_holding = sorted(members, key=lambda m: (-held[m], m))
    quota = {m: base + (1 if i < extra else 0) for i, m in enumerate(by_holding)}
    counts = dict.fromkeys(members, 0)
    target: list[str | None] = [None] * partitions
    for p, holder in enumerate(current):
        if holder in quota and counts[holder] < quota[holder]:
            target[p] = holder
            counts[holder] += 1
    free = iter([p for p in range(partitions) if target[p] is None])
    for m in members:
        while counts[m] < quota[m]:
            target[next(free)] = m
            counts[m] += 1
    return target


class Coordinator:
    def __init__(self, heartbeat_timeout: float, release_timeout: float = 30.0,
                 heads: dict[str, list[int]] | None = None):
        self.groups: dict[str, Group] = {}
        self.heads = heads if heads is not None else {}    # group -> last seq per partition
        self.heartbeat_timeout = heartbeat_timeout
        self.release_timeout = release_timeout

    def add_group(self, name: str, partitions: int, cursors: list[int]) -> Group:
        group = Group(name, partitions, list(cursors))
        group.unclean = set(range(partitions))     # we cannot know what was handled before
        self.groups[name] = group
        return group

    # -- membership ----------------------------------------------------------
    def join(self, group: Group, member: str, identity: bytes, now: float,
             host: str = "", pid: int = 0) -> Outgoing:
        info = group.members.get(member)
        if info is not None:
            # a restarted member with the same name: whatever it held is gone
            self._drop_member(group, member, clean=False)
        group.members[member] = MemberInfo(member, identity, now, now, host, pid)
        log.info("member_joined", group=group.name, member=member, host=host, pid=pid)
        return self._rebalance(group, now, force_notify=member)

    def seen(self, group: Group, member: str, identity: bytes | None, now: float) -> bool:
        """Note a sign of life; `identity` (None for heartbeats, which come from the
        member's heartbeat socket) is where assignments go from now on."""
        info = group.members.get(member)
        if info is None:
            return False
        info.last_seen = now
        if identity is not None:
            info.identity = identity
        return True

    def leave(self, group: Group, member: str, acks: dict[int, int], now: float) -> Outgoing:
        if member not in group.members:
            return []
        self.ack(group, member, acks)
        self._drop_member(group, member)
        log.info("member_left", group=group.name, member=member)
        return self._rebalance(group, now)

    def exited(self, group: Group, member: str, pid: int, poison: dict[int, list[int]], now: float) -> Outgoing:
        """The launcher saw the member's process end: free its partitions at once (unclean:
        what it handled but did not ack comes again, flagged) and record the poison."""
        for p, seqs in poison.items():
            if 0 <= p < group.partitions and seqs:
                group.skip.setdefault(p, set()).update(seqs)
        info = group.members.get(member)
        out: Outgoing = []
        if info is not None and (not pid or not info.pid or info.pid == pid):
            self._drop_member(group, member, clean=False)
            log.warning("member_exited", group=group.name, member=member, pid=pid)
            out = self._rebalance(group, now)
        # poison in partitions a live member holds already (it was granted before the
        # poison was known): tell the holder to pass over it too
        told = {ident for ident, _ in out}
        for name, info in group.members.items():
            skip = {p: sorted(group.skip[p]) for p in info.view if p in poison and p in group.skip}
            if skip and info.identity not in told:
                out.append((info.identity, Assign(group=group.name, partitions=list(info.view), skip=skip)))
        return out

    def expire(self, now: float) -> Outgoing:
        out: Outgoing = []
        for group in self.groups.values():
            dead = [m for m, info in group.members.items()
                    if now - info.last_seen > self.heartbeat_timeout]
            for m in dead:
                log.warning("member_lost", group=group.name, member=m,
                            silent_for=round(now - group.members[m].last_seen, 2))
                self._drop_member(group, m, clean=False)
            stuck = [p for p, t in group.revoked_at.items() if now - t > self.release_timeout]
            for p in stuck:
                log.warning("release_timed_out", group=group.name, partition=p, owner=group.owner[p])
                group.owner[p] = None
                group.revoked_at.pop(p, None)
            if dead or stuck:
                out += self._rebalance(group, now)
        return out

    def _drop_member(self, group: Group, member: str, clean: bool = True) -> None:
        group.members.pop(member, None)
        for p in range(group.partitions):
            if group.owner[p] == member:
                if not clean:
                    group.unclean.add(p)
                group.owner[p] = None
                group.revoked_at.pop(p, None)
            if group.target[p] == member:
                group.target[p] = None

    # -- acks ----------------------------------------------------------------
    def ack(self, group: Group, member: str, acks: dict[int, int]) -> None:
        cursors, owner = group.cursors, group.owner
        for p, seq in acks.items():
            if 0 <= p < group.partitions and owner[p] == member and seq > cursors[p]:
                cursors[p] = seq

    def released(self, group: Group, member: str, acks: dict[int, int], now: float) -> Outgoing:
        self.ack(group, member, acks)
        for p in acks:
            # also when the revoke was cancelled meanwhile (target is the member again):
            # the member has dropped the stream, so it must be granted afresh
            if 0 <= p < group.partitions and group.owner[p] == member:
                group.owner[p] = None
                group.revoked_at.pop(p, None)
        return self._rebalance(group, now)

    # -- assignment ----------------------------------------------------------
    def _rebalance(self, group: Group, now: float, force_notify: str | None = None) -> Outgoing:
        group.target = balanced(group.partitions, list(group.members), group.target)
        grants: dict[str, dict[int, int]] = {}
        for p in range(group.partitions):
            holder, want = group.owner[p], group.target[p]
            if holder is None and want is not None:
                group.owner[p] = want
                grants.setdefault(want, {})[p] = group.cursors[p]
            elif holder is not None and holder != want and p not in group.revoked_at:
                group.revoked_at[p] = now
            elif holder is not None and holder == want:
                group.revoked_at.pop(p, None)     # a revoke cancelled by a later rebalance
        out: Outgoing = []
        for name, info in group.members.items():
            view = tuple(p for p in range(group.partitions)
                         if group.owner[p] == name and group.target[p] == name)
            if view != info.view or name in grants or name == force_notify:
                info.view = view
                granted = grants.get(name, {})
                redelivered = self._redelivered(group, granted)
                out.append((info.identity, Assign(group=group.name, partitions=list(view),
                                                  grants=granted, redelivered=redelivered,
                                                  skip=self._skips(group, granted))))
        if out:
            log.info("group_assigned", group=group.name,
                     members={m: len(i.view) for m, i in group.members.items()},
                     pending=len(group.revoked_at))
        return out

    def _redelivered(self, group: Group, granted: dict[int, int]) -> dict[int, int]:
        heads = self.heads.get(group.name)
        flag = group.flag_upto
        if heads:
            for p in granted:
                if p in group.unclean:
                    flag[p] = max(flag.get(p, 0), heads[p])
        group.unclean.difference_update(granted)
        out = {}
        for p in granted:
            upto = flag.get(p)
            if upto is not None:
                if upto > group.cursors[p]:
                    out[p] = upto
                else:
                    del flag[p]
        return out

    @staticmethod
    def _skips(group: Group, granted: dict[int, int]) -> dict[int, list[int]]:
        """Poison seqs past the cursor of each granted partition (older ones are forgotten)."""
        if not group.skip:
            return {}
        out = {}
        for p in granted:
            seqs = group.skip.get(p)
            if seqs:
                seqs = {s for s in seqs if s > group.cursors[p]}
                if seqs:
                    group.skip[p] = seqs
                    out[p] = sorted(seqs)
                else:
                    del group.skip[p]
        return out

    def replay(self, group: Group, cursor: int) -> Outgoing:
        """Move every cursor of the group to `cursor` and restart its members there."""
        group.cursors = [cursor] * group.partitions
        out: Outgoing = []
        for name, info in group.members.items():
            if info.view:
                out.append((info.identity, Assign(group=group.name, partitions=list(info.view),
                                                  grants={p: cursor for p in info.view}, replay=True)))
        return out

    def member_of_identity(self, identity: bytes) -> tuple[Group, MemberInfo] | None:
        for group in self.groups.values():
            for info in group.members.values():
                if info.identity == identity:
                    return group, info
        return None
