"""The coord messages of a group member (no socket): what it sends to the router, encoded,
and what it reads from it, decoded.

A fetch reply is read without its events first (`RecordsHead`): the fetcher decodes them
(`records_decoder`, in one msgspec call: the envelopes typed, the payloads kept raw until a
handler needs them) when they reach the head of the stream's queue, and keeps the reply's
bytes until then. A reply whose events do not all decode so is read again with its events
left raw, and the fetcher decodes them one by one.
"""

from __future__ import annotations

import os
import secrets
import socket
import time
import traceback

import msgspec

from nexus.common import redact
from nexus.protocol.events import DECODE_ERRORS, WireEvent, encode
from nexus.protocol.wire import (
    Ack,
    Assign,
    Coord,
    DeadLetter,
    DeadLetterStored,
    Error,
    Fetch,
    Heartbeat,
    Join,
    Leave,
    MemberExited,
    Records,
    Released,
    coord_decoder,
    encoder,
    topic,
)


class ReceivedRecords(Records, tag="records"):  # type: ignore[misc]  # (mypy: frozen is inherited)
    events: list[WireEvent]  # type: ignore[assignment]  # the same field, decoded


class RecordsHead(Coord, tag="records", frozen=True, forbid_unknown_fields=False):
    """A fetch reply without its events (msgspec skips them): they stay in the bytes."""

    group: str
    partition: int
    after: int
    upto: int
    seqs: list[int]
    complete: bool = True


records_decoder = msgspec.msgpack.Decoder(ReceivedRecords)
received_decoder = msgspec.msgpack.Decoder(Assign | RecordsHead | Error | DeadLetterStored)


class GroupClient:
    def __init__(self, group: str, member: str):
        self.group, self.member = group, member
        # unguessable, never shown: the router's ROUTER sockets hand an identity over to
        # the newest connection that claims it, so one built from name and pid (both in
        # `nexus status`) would let any key take a member's replies away
        self._token = secrets.token_hex(16)

    def identity(self, role: str = "") -> bytes:
        """The coord socket identity of this process (`role`: a second socket, e.g. "hb")."""
        return f"{self.group}/{self.member}/{self._token}{'/' + role if role else ''}".encode()

    def topic(self, partition: int) -> bytes:
        """The SUB topic of a partition's live deliveries."""
        return topic(self.group, partition)

    # -- sent ----------------------------------------------------------------------
    def join(self, holding: dict[int, int]) -> bytes:
        """`holding`: after a router restart, the partitions we still run, to keep them."""
        return encoder.encode(
            Join(group=self.group, member=self.member, host=socket.gethostname(), pid=os.getpid(), holding=holding)
        )

    def heartbeat(self, stats: dict, metrics: dict | None = None) -> bytes:
        return encoder.encode(Heartbeat(group=self.group, member=self.member, stats=stats, metrics=metrics or {}))

    def fetch(self, partition: int, after: int, limit: int) -> bytes:
        return encoder.encode(
            Fetch(group=self.group, member=self.member, partition=partition, after=after, limit=limit)
        )

    def ack(self, acks: dict[int, int]) -> bytes:
        return encoder.encode(Ack(group=self.group, member=self.member, acks=acks))

    def released(self, acks: dict[int, int]) -> bytes:
        return encoder.encode(Released(group=self.group, member=self.member, acks=acks))

    def leave(self, acks: dict[int, int], busy: list[int]) -> bytes:
        return encoder.encode(Leave(group=self.group, member=self.member, acks=acks, busy=busy))

    def dead_letter(
        self, partition: int, seq: int, event: WireEvent, error: BaseException, attempts: int, first_failed: float
    ) -> bytes:
        return encoder.encode(
            DeadLetter(
                group=self.group,
                member=self.member,
                seq=seq,
                partition=partition,
                event=msgspec.Raw(encode(event)),
                error_type=type(error).__name__,
                # stored and shown by `nexus dlq`: no secret of ours in it (a server may echo one)
                error=redact.scrub(str(error)),
                traceback=redact.scrub("".join(traceback.format_exception(error)[-12:])),
                attempts=attempts,
                first_failed=first_failed or time.time(),
            )
        )

    def exited(self, exit_code: int, reason: str) -> bytes:
        """Said for ourselves when no launcher will say it (see Watchdog)."""
        return encoder.encode(
            MemberExited(group=self.group, member=self.member, exit_code=exit_code, reason=reason, pid=os.getpid())
        )

    # -- read ----------------------------------------------------------------------
    @staticmethod
    def read(raw: bytes) -> Coord | None:
        """A message from the router (Assign, RecordsHead, Error, DeadLetterStored; Pulse on
        the heartbeat's socket), or None when it is unreadable."""
        try:
            return received_decoder.decode(raw)
        except DECODE_ERRORS:
            try:
                return coord_decoder.decode(raw)  # a fetch reply's events left raw, or a pulse
            except DECODE_ERRORS:
                return None
