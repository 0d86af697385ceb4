"""The partitions a member holds (no sockets): a stream per partition, the events queued
over all of them, what was acked, and what an Assign from the router changes.

A revoked partition is given up (Released) once no call runs on its head; until then it
keeps the head, so nothing past a call still running is acked by anyone.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from nexus.member.stream import PartitionStream
from nexus.protocol.wire import Assign


@dataclass
class Reassignment:
    """What an Assign changed, for the runtime to act on."""

    subscribe: list[int] = field(default_factory=list)  # new streams: their live deliveries
    unsubscribe: list[int] = field(default_factory=list)  # revoked
    released: dict[int, int] = field(default_factory=dict)  # given up now: partition -> final ack
    fetch: list[PartitionStream] = field(default_factory=list)  # granted: read from their cursor
    skipped: list[PartitionStream] = field(default_factory=list)  # poison passed over: a new head
    replay: bool = False  # journal replay: events handled before come again, to be handled again


class Partitions:
    def __init__(self) -> None:
        self.streams: dict[int, PartitionStream] = {}
        self.queued = 0  # events in all the streams' queues (the intake budget counts them)
        self.acked: dict[int, int] = {}  # partition -> the last ack sent

    def assign(self, msg: Assign) -> Reassignment:
        change = Reassignment()
        wanted = set(msg.partitions)
        for p, st in list(self.streams.items()):
            if p not in wanted and not st.revoked:
                st.revoked = True
                change.unsubscribe.append(p)
                self.drop_queued(st)
                upto = self.release(st)
                if upto is not None:
                    change.released[p] = upto
        for p, cursor in msg.grants.items():
            redelivered = msg.redelivered.get(p, 0)
            old = self.streams.get(p)
            if old is not None and not old.revoked:
                self.drop_queued(old)
                if msg.replay:
                    # journal replay: rewind; what we handled before comes again, flagged
                    old.redelivered_upto = max(old.redelivered_upto, old.watermark)
                    old.watermark = old.queue[0][0] if old.busy else cursor
                    self.acked[p] = cursor
                    change.replay = True
                else:
                    # granted again after a rejoin: keep what we handled ourselves
                    old.watermark = max(cursor, old.queue[0][0] if old.busy else old.handled_upto())
                    old.redelivered_upto = max(old.redelivered_upto, redelivered)
                change.fetch.append(old)
                continue
            self.acked.pop(p, None)
            st = self.streams[p] = PartitionStream(p, cursor, redelivered)
            change.subscribe.append(p)
            change.fetch.append(st)
        for p, seqs in msg.solo.items():
            held = self.streams.get(p)
            if held is not None and not held.revoked:
                held.solo = set(seqs)
        for p, seqs in msg.skip.items():
            held = self.streams.get(p)
            if held is not None and not held.revoked:
                # dead-lettered poison: pass over it (queued copies leave the queue)
                self.queued -= held.add_skip(seqs)
                change.skipped.append(held)
        return change

    def drop_queued(self, st: PartitionStream) -> None:
        """Forget queued events (not the one being handled); they stay in the journal."""
        self.queued -= st.drop_queued()

    def release(self, st: PartitionStream) -> int | None:
        """Give up a revoked stream with no call on its head: returns its final ack (the
        runtime sends Released), or None while it is not done or not ours any more."""
        if st.revoked and not st.busy and self.streams.get(st.partition) is st:
            del self.streams[st.partition]
            return st.handled_upto()
        return None

    # -- intake and dispatch count the queued events ------------------------------------------
    def take(self, st: PartitionStream, seqs: list[int], events: list, upto: int) -> int:
        """Queue events newer than `st`'s watermark; returns how many were queued."""
        n = st.take(seqs, events, upto)
        self.queued += n
        return n

    def hold(self, st: PartitionStream, seqs: list[int], frame: Any, decode: Callable, upto: int) -> int:
        """Queue events newer than `st`'s watermark undecoded (see PartitionStream.hold)."""
        n = st.hold(seqs, frame, decode, upto)
        self.queued += n
        return n

    def unhold(self, st: PartitionStream) -> None:
        """`st`'s queue ran empty: decode its next held delivery into it."""
        self.queued -= st.unhold()

    def popped(self, n: int) -> None:
        """`n` events left the queues (handled, dead-lettered or dropped as duplicates)."""
        self.queued -= n

    # -- acks ---------------------------------------------------------------------------------
    def holding(self) -> dict[int, int]:
        """Rejoining after a router restart: the partitions we still run, to keep them."""
        return {p: st.handled_upto() for p, st in self.streams.items() if not st.revoked}

    def due_acks(self) -> dict[int, int]:
        """The partitions handled further since the last ack sent: partition -> handled up to."""
        acks = {}
        for p, st in self.streams.items():
            upto = st.handled_upto()
            if upto > self.acked.get(p, -1):
                acks[p] = upto
                if st.skip:
                    st.forget_skips_upto(upto)  # passed: no delivery checks them again
        return acks

    def acks_sent(self, acks: dict[int, int]) -> None:
        self.acked.update(acks)

    def final_acks(self) -> dict[int, int]:
        """Every partition's handled-up-to (also from another thread: the watchdog's)."""
        return {p: st.handled_upto() for p, st in list(self.streams.items())}

    # -- a graceful stop --------------------------------------------------------------------------
    def revoke_all(self) -> None:
        for st in self.streams.values():
            st.revoked = True

    def busy(self) -> list[int]:
        """Partitions with a call running on their head."""
        return [p for p, st in self.streams.items() if st.busy]
