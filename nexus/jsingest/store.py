"""From a producer's message to messages in JetStream: the router's intake validates it
(nexus/router/intake.py, unchanged: contracts, sizes, untyped types, rate limits, the
producer seq rules), every accepted event's wire bytes go to its shard's subject with
`Nats-Msg-Id: <event id>` (the stream drops a resend within nats.dedup_window), and every
event rejected for its content goes to `{stream}_REJECTED` with its reason.

A confirmed batch is answered only when every event of it, and every earlier event of the
same producer still in flight, has its PubAck: the intake settles a producer's seqs as it
reads them, so a resend of a batch whose publishes are still pending is a "duplicate"
there, and its ACK must wait for the first copy's PubAcks."""

from __future__ import annotations

import asyncio
import collections
import functools
import time
from typing import Any

import msgspec

from nexus.jetstream.names import MSG_ID, Names
from nexus.jsingest import rejects
from nexus.jsingest.publisher import Publisher
from nexus.jsingest.telemetry import IngestTelemetry
from nexus.protocol.events import DECODE_ERRORS
from nexus.protocol.gatekeeper import Grant
from nexus.protocol.wire import ProducerBatch, ProducerReply, encoder
from nexus.router.intake import Accepted, Intake, Outcome

RECENT_REJECTS = 10  # rejections (time, reason, detail, source, id) in the stats, as the router shows


class _Id(msgspec.Struct):
    id: str = ""


class _Who(msgspec.Struct):
    producer: str = ""


_decode_id = msgspec.msgpack.Decoder(_Id).decode
_decode_who = msgspec.msgpack.Decoder(_Who).decode
_check_msgpack = msgspec.msgpack.Decoder(msgspec.Raw).decode  # one whole msgpack value


class Store:
    def __init__(self, intake: Intake, publisher: Publisher, names: Names):
        self.intake, self.publisher, self.names = intake, publisher, names
        self.telemetry = IngestTelemetry(intake, publisher)
        self.inflight: dict[str, set[asyncio.Task]] = {}  # confirm producer -> its publishes pending
        self.kept: collections.Counter[str] = collections.Counter()  # rejected stored, by category
        self.requests = 0  # events from the NATS request intake

    # -- producers (the router's protocol) -------------------------------------------------
    def take(
        self, frame: bytes, confirm: bool, grant: Grant | None = None, source: str = ""
    ) -> tuple[Outcome, list[asyncio.Task]]:
        """Validate one producer message and start storing what it carries: the outcome
        and the publishes of its accepted events."""
        outcome = self.intake.take(frame, confirm, time.monotonic(), grant)
        tasks = self._publish(outcome.accepted)
        if tasks:
            self._count_when_stored(outcome.accepted, tasks)
        for r in rejects.rejected(frame, outcome, self.intake.max_event_bytes, source):
            self.kept[rejects.category(r.reason)] += 1
            self.publisher.submit(self.names.rejected_subject, r.payload, r.headers())
        return outcome, tasks

    def confirm(self, frame: bytes, grant: Grant | None = None) -> tuple[Outcome, list[asyncio.Task]]:
        """A confirm-mode message: its outcome and the publishes its ACK waits for."""
        try:
            who = _decode_who(frame).producer
        except DECODE_ERRORS:
            who = ""  # unreadable: intake answers with an error, nothing to wait for
        outcome, tasks = self.take(frame, True, grant)
        if not who:
            return outcome, tasks
        pending = self.inflight.setdefault(who, set())
        settled = functools.partial(self._settled, who)
        for task in tasks:
            pending.add(task)
            task.add_done_callback(settled)
        return outcome, list(pending)

    def _settled(self, who: str, task: asyncio.Task) -> None:
        pending = self.inflight.get(who)
        if pending is not None:
            pending.discard(task)
            if not pending:
                del self.inflight[who]

    @staticmethod
    async def reply_when_stored(outcome: Outcome, waits: list[asyncio.Task]) -> ProducerReply | None:
        """The producer's reply once `waits` are stored; None if any was given up (exit):
        no ACK then, the producer sends again."""
        if waits:
            await asyncio.wait(waits)
            if any(t.cancelled() or t.exception() is not None for t in waits):
                return None
        return ProducerReply(ack=outcome.ack, nacks=outcome.nacks, error=outcome.error)

    def _count_when_stored(self, acc: Accepted, tasks: list[asyncio.Task]) -> None:
        """The accepted metric counts a batch's events once all are stored."""
        left = [len(tasks)]

        def stored(task: asyncio.Task) -> None:
            left[0] -= 1
            if left[0] == 0 and not task.cancelled():
                self.intake.journaled([acc])

        for task in tasks:
            task.add_done_callback(stored)

    def _publish(self, acc: Accepted) -> list[asyncio.Task]:
        names, submit = self.names, self.publisher.submit
        shards = names.shards
        tasks = []
        # khash is key_hash(partition_key(key, source)): names.shard_of's hash
        for raw, khash in zip(acc.events, acc.khashes, strict=True):
            event_id = _decode_id(raw).id
            tasks.append(submit(names.event_subject(khash % shards), bytes(raw), {MSG_ID: event_id}))
        return tasks

    # -- any NATS client (request/reply on names.ingest_subject) ------------------------------
    async def request(self, data: bytes) -> dict[str, Any]:
        """One wire-form event from a NATS request: the reply once it is stored (or why
        not). Raises CancelledError when the process stops before its PubAck."""
        self.requests += 1
        try:
            _check_msgpack(data)  # alone: garbage would spill into the batch frame below
        except DECODE_ERRORS as exc:
            reason = f"malformed: unreadable event: {exc}"
            self.intake.count_rejected("malformed")
            self.kept["malformed"] += 1
            kept = rejects.Rejected(reason, "nats", bytes(data[: self.intake.max_event_bytes]))
            self.publisher.submit(self.names.rejected_subject, kept.payload, kept.headers())
            return {"ok": False, "seq": 0, "error": reason}
        frame = encoder.encode(ProducerBatch(events=[msgspec.Raw(data)]))
        outcome, tasks = self.take(frame, False, source="nats")
        if outcome.error or outcome.nacks:
            answer: dict[str, Any] = {"ok": False, "seq": 0, "error": outcome.error or outcome.nacks[0].reason}
            if outcome.nacks and outcome.nacks[0].retry_after > 0:
                answer["retry_after"] = outcome.nacks[0].retry_after
            return answer
        ack = await tasks[0]
        return {"ok": True, "seq": ack.seq, "error": ""}

    def stats(self) -> dict[str, Any]:
        intake, pub = self.intake, self.publisher
        return {
            "engine": "nats",
            "accepted": intake.accepted_total,
            "rejected": dict(intake.rejected),
            "rejected_kept": dict(self.kept),
            "duplicates": intake.duplicates_total,  # resent producer seqs (acked, not stored again)
            "duplicates_stored": pub.duplicates,  # PubAcks of a msg id the stream had already
            "stored": pub.stored,
            "publish_retries": pub.retries,
            "pending": pub.pending,
            "dropped": pub.dropped,
            "producers": len(intake.high),  # confirm producer ids seen (bounded, LRU)
            "rate_limited": intake.rejected.get("rate_limited", 0),
            "nats_requests": self.requests,
            "rate_limits": intake.limiter.describe(),
            "recent_rejects": list(intake.reject_log)[-RECENT_REJECTS:],
            "metrics": self.telemetry.snapshot(),  # the router's metric names
        }
