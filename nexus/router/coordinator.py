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

from collections.abc import Callable
from dataclasses import dataclass, field

import structlog

from nexus.protocol.wire import Assign, Coord

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
    view: tuple[int, ...] = ()  # partitions the member was last told to run


@dataclass
class Group:
    name: str
    partitions: int
    cursors: list[int]
    members: dict[str, MemberInfo] = field(default_factory=dict)
    owner: list[str | None] = field(default_factory=list)  # who holds the partition now
    target: list[str | None] = field(default_factory=list)  # who should hold it
    revoked_at: dict[int, float] = field(default_factory=dict)
    # partitions whose earlier owners may have handled events they never acked (one
    # died, or the router restarted), with the stream's last seq at that moment: every
    # grant flags events up to it as redelivered until the cursor has passed it (not
    # only the first grant: a partition can move on before its new owner got that far)
    unclean: dict[int, int] = field(default_factory=dict)
    # after a router restart, members that survived it rejoin with the partitions they
    # still hold: those go back to them (their dedup windows then drop redeliveries),
    # and unclaimed partitions wait until `settle_until` for the others to rejoin
    claims: dict[int, str] = field(default_factory=dict)
    settle_until: float = 0.0
    fresh: bool = True  # no join since the router started
    # dead-lettered poison (events that killed or hung members): partition -> seqs every
    # next owner passes over (Assign.skip), until the cursor is past them
    skip: dict[int, set[int]] = field(default_factory=dict)
    # poison whose dead letter is not stored yet: its partition is granted to no one until
    # it is (a skip applied before the row exists loses the event if the router stops)
    poison_pending: dict[int, set[int]] = field(default_factory=dict)
    # events in flight together when a member crashed: partition -> seqs every next owner
    # runs alone (Assign.solo), so the next crash names the culprit alone (crashes.py)
    suspects: dict[int, set[int]] = field(default_factory=dict)

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
    def __init__(
        self,
        heartbeat_timeout: float,
        release_timeout: float = 30.0,
        heads: dict[str, list[int]] | None = None,
        end: Callable[[], int] | None = None,
    ):
        self.groups: dict[str, Group] = {}
        self.heads = heads if heads is not None else {}  # group -> last seq per partition
        # the journal's last seq: no ack or claim moves a cursor past it (events accepted
        # later would get seqs at or below the cursor and never be delivered)
        self.end = end
        self.heartbeat_timeout = heartbeat_timeout
        self.release_timeout = release_timeout
        self.rejoin_grace = heartbeat_timeout  # survivors notice a restart by a refused heartbeat

    def add_group(self, name: str, partitions: int, cursors: list[int]) -> Group:
        group = Group(name, partitions, list(cursors))
        group.unclean = {p: self._head(name, p) for p in range(partitions)}  # we cannot know what was handled
        self.groups[name] = group
        return group

    def remove_group(self, name: str) -> list[bytes]:
        """Forget a group (a reload removed it), cursors too; the identities of members
        still joined, to be told."""
        group = self.groups.pop(name, None)
        self.heads.pop(name, None)
        return [info.identity for info in group.members.values()] if group is not None else []

    def cursor_snapshot(self) -> dict[str, list[int]]:
        """Every group's cursors, copied: what the flusher saves."""
        return {name: list(g.cursors) for name, g in self.groups.items()}

    def expect_rejoin(self, now: float) -> None:
        """The router restarted under live members (the launcher knows): hold back
        unclaimed partitions for one grace period even if the first member back is a
        fresh one, so no partition goes to a newcomer while its old holder, not yet
        aware of the restart, still runs it."""
        for group in self.groups.values():
            group.fresh = False
            group.settle_until = now + self.rejoin_grace

    # -- membership ----------------------------------------------------------
    def join(
        self,
        group: Group,
        member: str,
        identity: bytes,
        now: float,
        host: str = "",
        pid: int = 0,
        holding: dict[int, int] | None = None,
    ) -> Outgoing:
        info = group.members.get(member)
        if info is not None:
            # a restarted member with the same name: whatever it held is gone
            self._drop_member(group, member, clean=False)
        if group.fresh:
            group.fresh = False
            if holding:  # the first member back still holds partitions: the router restarted under it
                group.settle_until = now + self.rejoin_grace
        end = self.end() if self.end is not None and holding else 1 << 63
        for p, upto in (holding or {}).items():
            if 0 <= p < group.partitions and group.owner[p] is None and group.claims.get(p, member) == member:
                group.claims[p] = member
                if upto > end:
                    # it handled seqs the journal no longer has (a torn tail cut on restart):
                    # its claim is clamped, never a cursor past the end (review #4)
                    log.warning(
                        "claim_past_end", group=group.name, member=member, partition=p, claimed=upto, last_seq=end
                    )
                    upto = end
                if upto > group.cursors[p]:
                    group.cursors[p] = upto  # what it handled: its acks were lost with the old router
        group.members[member] = MemberInfo(member, identity, now, now, host, pid)
        log.info(
            "member_joined",
            group=group.name,
            member=member,
            host=host,
            pid=pid,
            reclaimed=sum(1 for m in group.claims.values() if m == member),
        )
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

    def leave(self, group: Group, member: str, acks: dict[int, int], now: float, busy=()) -> Outgoing:
        if member not in group.members:
            return []
        self.ack(group, member, acks)
        for p in busy:
            # its call still ran when the member left (drain deadline): it may have had
            # effects, so the next owner gets it flagged redelivered
            if 0 <= p < group.partitions and group.owner[p] == member:
                group.unclean[p] = max(group.unclean.get(p, 0), self._head(group.name, p))
        self._drop_member(group, member)
        log.info("member_left", group=group.name, member=member)
        return self._rebalance(group, now)

    def exited(self, group: Group, member: str, pid: int, poison: dict[int, list[int]], now: float) -> Outgoing:
        """The launcher saw the member's process end: free its partitions at once (unclean:
        what it handled but did not ack comes again, flagged). A partition with poison
        waits for `poison_stored`: then its next owner passes over the poison."""
        for p, seqs in poison.items():
            if 0 <= p < group.partitions and seqs:
                group.poison_pending.setdefault(p, set()).update(seqs)
        info = group.members.get(member)
        if info is not None and (not pid or not info.pid or info.pid == pid):
            self._drop_member(group, member, clean=False)
            log.warning("member_exited", group=group.name, member=member, pid=pid)
            return self._rebalance(group, now)
        return []

    def poison_stored(self, group: Group, partition: int, seq: int, now: float) -> Outgoing:
        """The dead letter of poison `seq` is stored (or there is nothing to store): from
        now on every owner of the partition passes over it."""
        pending = group.poison_pending.get(partition)
        if pending is None or seq not in pending:
            return []
        pending.discard(seq)
        group.skip.setdefault(partition, set()).add(seq)
        if pending:
            return []
        del group.poison_pending[partition]
        out = self._rebalance(group, now)
        # a live member holds it already (granted before the poison was known): tell it
        told = {ident for ident, _ in out}
        for info in group.members.values():
            if partition in info.view and info.identity not in told and partition in group.skip:
                out.append(
                    (
                        info.identity,
                        Assign(
                            group=group.name,
                            partitions=list(info.view),
                            skip={partition: sorted(group.skip[partition])},
                        ),
                    )
                )
        return out

    def suspect(self, group: Group, inflight: dict[int, list[int]], poison: dict[int, list[int]]) -> None:
        """A member died with several events in flight: any of them may be the cause."""
        if sum(len(s) for s in inflight.values()) < 2:
            return
        for p, seqs in inflight.items():
            if 0 <= p < group.partitions:
                group.suspects.setdefault(p, set()).update(s for s in seqs if s not in poison.get(p, ()))

    def expire(self, now: float) -> Outgoing:
        out: Outgoing = []
        for group in self.groups.values():
            dead = [m for m, info in group.members.items() if now - info.last_seen > self.heartbeat_timeout]
            for m in dead:
                log.warning(
                    "member_lost", group=group.name, member=m, silent_for=round(now - group.members[m].last_seen, 2)
                )
                self._drop_member(group, m, clean=False)
            settled = bool(group.settle_until) and now >= group.settle_until
            if settled:
                group.settle_until = 0.0
            stuck = [p for p, t in group.revoked_at.items() if now - t > self.release_timeout]
            for p in stuck:
                log.warning("release_timed_out", group=group.name, partition=p, owner=group.owner[p])
                # the old owner may still be handling events past its last ack: whatever
                # the new owner gets up to the head may be a repeat, so it is flagged
                group.unclean[p] = max(group.unclean.get(p, 0), self._head(group.name, p))
                group.owner[p] = None
                group.revoked_at.pop(p, None)
            if dead or stuck or settled:
                out += self._rebalance(group, now)
        return out

    def _drop_member(self, group: Group, member: str, clean: bool = True) -> None:
        group.members.pop(member, None)
        for p in [p for p, m in group.claims.items() if m == member]:
            del group.claims[p]
        for p in range(group.partitions):
            if group.owner[p] == member:
                if not clean:
                    group.unclean[p] = max(group.unclean.get(p, 0), self._head(group.name, p))
                group.owner[p] = None
                group.revoked_at.pop(p, None)
            if group.target[p] == member:
                group.target[p] = None

    # -- acks ----------------------------------------------------------------
    def ack(self, group: Group, member: str, acks: dict[int, int]) -> None:
        cursors, owner = group.cursors, group.owner
        end = self.end() if self.end is not None else 1 << 63
        for p, seq in acks.items():
            if 0 <= p < group.partitions and owner[p] == member and seq > cursors[p]:
                cursors[p] = min(seq, max(end, cursors[p]))

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
        claims = group.claims
        if group.settle_until and all(claims.get(p) or group.owner[p] for p in range(group.partitions)):
            group.settle_until = 0.0  # every partition is back: no need to wait
        if group.settle_until:
            # settling after a router restart: only claimed partitions are granted, to their claimer
            group.target = [claims.get(p) or group.owner[p] for p in range(group.partitions)]
        else:
            current = [claims.get(p) or group.target[p] for p in range(group.partitions)]
            claims.clear()
            group.target = balanced(group.partitions, list(group.members), current)
        grants: dict[str, dict[int, int]] = {}
        for p in range(group.partitions):
            holder, want = group.owner[p], group.target[p]
            if holder is None and want is not None and p not in group.poison_pending:
                group.owner[p] = want
                grants.setdefault(want, {})[p] = group.cursors[p]
            elif holder is not None and holder != want and p not in group.revoked_at:
                group.revoked_at[p] = now
            elif holder is not None and holder == want:
                group.revoked_at.pop(p, None)  # a revoke cancelled by a later rebalance
        out: Outgoing = []
        for name, info in group.members.items():
            view = tuple(p for p in range(group.partitions) if group.owner[p] == name and group.target[p] == name)
            if view != info.view or name in grants or name == force_notify:
                info.view = view
                granted = grants.get(name, {})
                redelivered = {}
                for p, cursor in granted.items():
                    upto = group.unclean.get(p, 0)
                    if upto > cursor:
                        redelivered[p] = upto
                    else:
                        group.unclean.pop(p, None)  # the cursor is past it: clean again
                out.append(
                    (
                        info.identity,
                        Assign(
                            group=group.name,
                            partitions=list(view),
                            grants=granted,
                            redelivered=redelivered,
                            skip=self._skips(group, granted),
                            solo=self._past_cursor(group, group.suspects, granted),
                        ),
                    )
                )
        if out:
            log.info(
                "group_assigned",
                group=group.name,
                members={m: len(i.view) for m, i in group.members.items()},
                pending=len(group.revoked_at),
            )
        return out

    def _head(self, group: str, p: int) -> int:
        heads = self.heads.get(group)
        return heads[p] if heads and p < len(heads) else 0

    @staticmethod
    def _skips(group: Group, granted: dict[int, int]) -> dict[int, list[int]]:
        """Poison seqs past the cursor of each granted partition (older ones are forgotten)."""
        return Coordinator._past_cursor(group, group.skip, granted)

    @staticmethod
    def _past_cursor(group: Group, table: dict[int, set[int]], granted: dict[int, int]) -> dict[int, list[int]]:
        """The seqs of `table` past the cursor of each granted partition (older ones are forgotten)."""
        if not table:
            return {}
        out = {}
        for p in granted:
            seqs = table.get(p)
            if seqs:
                seqs = {s for s in seqs if s > group.cursors[p]}
                if seqs:
                    table[p] = seqs
                    out[p] = sorted(seqs)
                else:
                    del table[p]
        return out

    def replay(self, group: Group, cursor: int) -> Outgoing:
        """Move every cursor of the group to `cursor` and restart its members there."""
        group.cursors = [cursor] * group.partitions
        out: Outgoing = []
        for _name, info in group.members.items():
            if info.view:
                out.append(
                    (
                        info.identity,
                        Assign(
                            group=group.name,
                            partitions=list(info.view),
                            grants={p: cursor for p in info.view},
                            replay=True,
                        ),
                    )
                )
        return out
