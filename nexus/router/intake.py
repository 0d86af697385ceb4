"""Router intake: bytes from a producer -> validated journal entries or rejections.

Nothing here trusts its input: every failure becomes a (reason, detail) pair that
is counted, and in confirm mode sent back as a NACK. No byte string raises out.
"""

from __future__ import annotations

import collections
import time
from dataclasses import dataclass, field
from typing import cast

import msgspec

from nexus.common import metricnames as names
from nexus.common.metrics import Counter
from nexus.errors import EventError
from nexus.protocol.events import CONTROL_RE, DECODE_ERRORS, TYPE_RE, Contracts, WireEvent, printable
from nexus.protocol.gatekeeper import Grant
from nexus.protocol.partitions import key_hash, partition_key
from nexus.protocol.wire import Nack, ProducerBatch, batch_decoder
from nexus.router.journal import encode_entries, entry_decoder
from nexus.router.ratelimit import RateLimiter

MAX_PRODUCERS = 100_000  # producer ids remembered for dedup (LRU)
RECENT_NACKS = 1_000  # per producer: NACKs repeated when a batch is resent
KEY_CACHE = 100_000  # partition keys whose hash is remembered (cleared when full)
_CONTROLS = "malformed event: control characters are not allowed - at `"


class _DecodedBatch(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """A ProducerBatch with its events decoded too: the bulk path decodes a batch's
    events in one call (msgspec in C) instead of one Python call per event."""

    events: list[WireEvent]
    producer: str = ""
    seq: int = 0
    floor: int = 0


_decode_all = msgspec.msgpack.Decoder(_DecodedBatch).decode


@dataclass
class Accepted:
    """Events accepted for the journal, column by column: `bodies` are their journal
    records (journal.encode_entries), the rest what fan-out needs without decoding them."""

    types: list[str] = field(default_factory=list)
    khashes: list[int] = field(default_factory=list)
    events: list[msgspec.Raw] = field(default_factory=list)
    bodies: list[bytes] = field(default_factory=list)
    counts: dict[tuple[str, str], int] = field(default_factory=dict)  # (type, source) -> events


@dataclass
class Outcome:
    accepted: Accepted
    nacks: list[Nack]
    ack: int = 0  # highest producer seq settled by this batch
    error: str = ""  # the whole message was unusable
    duplicates: int = 0


class Intake:
    def __init__(self, contracts: Contracts, limiter: RateLimiter, max_event_bytes: int, max_batch: int):
        self.contracts = contracts
        self.limiter = limiter
        self.max_event_bytes = max_event_bytes
        self.max_batch = max_batch
        self.high: collections.OrderedDict[str, int] = collections.OrderedDict()
        # CURVE on: producer id -> the key that first used it (journaled as "KEY/ID")
        self.owners: collections.OrderedDict[str, str] = collections.OrderedDict()
        self.recent_nacks: dict[str, collections.OrderedDict[int, Nack]] = {}
        self.rejected: collections.Counter[str] = collections.Counter()
        self.reject_log: collections.deque[dict] = collections.deque(maxlen=200)
        self.accepted_total = 0
        self._decode_event = msgspec.msgpack.Decoder(WireEvent).decode
        self._khash_cache: dict[str, int] = {}
        self._plain_types: set[tuple[str, int]] = set()
        self._good_sources: set[str] = set()  # sources without control characters
        self.duplicates_total = 0
        # metrics (the router's registry holds them): accepted is counted once journaled
        self.accepted_by = Counter(names.ACCEPTED, ("type", "source"), capped=("type", "source"))
        self.rejected_by = Counter(names.REJECTED, ("reason", "type", "source"), capped=("type", "source"))

    # -- dedup state -----------------------------------------------------------
    def remember(self, producer: str, pseq: int) -> None:
        """Rebuild dedup state from the journal on start."""
        if producer and pseq > self.high.get(producer, 0):
            self.high[producer] = pseq
            self.high.move_to_end(producer)
            if len(self.high) > MAX_PRODUCERS:
                self.high.popitem(last=False)

    def recovered(self, producer: str, pseq: int) -> None:
        """A journal entry at start: its producer's dedup state, and the key owning the
        producer id when it was sent over CURVE ("KEY/ID")."""
        self.remember(producer, pseq)
        key, sep, bare = producer.partition("/")
        if sep:
            self._own(bare, key)

    def _own(self, producer: str, key: str) -> None:
        self.owners[producer] = key
        self.owners.move_to_end(producer)
        if len(self.owners) > MAX_PRODUCERS:
            self.owners.popitem(last=False)

    # -- intake ------------------------------------------------------------------
    def _reject(self, category: str, detail: str, source: str = "", event_id: str = "", type_: str = "") -> None:
        self.rejected[category] += 1
        self.rejected_by.inc((category, type_, source))
        self.reject_log.append(
            {
                "time": time.time(),
                "reason": category,
                "detail": detail[:300],
                "source": source[:128],
                "id": event_id[:64],
            }
        )

    def decode_batch(self, frame: bytes) -> ProducerBatch | str:
        try:
            batch = batch_decoder.decode(frame)
        except DECODE_ERRORS as exc:
            detail = f"unreadable batch: {exc}"
            self._reject("bad_batch", detail)
            return detail
        if len(batch.events) > self.max_batch:
            detail = f"batch of {len(batch.events)} events exceeds max_batch {self.max_batch}"
            self._reject("bad_batch", detail)
            return detail
        if len(batch.producer) > 128 or batch.seq < 0:
            detail = "producer id longer than 128 characters or negative seq"
            self._reject("bad_batch", detail)
            return detail
        return batch

    def take(self, frame: bytes, confirm: bool, now: float, grant: Grant | None = None) -> Outcome:
        """`grant`: the sender's key when CURVE is on; its events must match its
        sources and types, and its producer id is its own."""
        decoded = self.decode_batch(frame)
        if isinstance(decoded, str):
            return Outcome(Accepted(), [], error=decoded)
        batch = decoded
        producer = batch.producer if confirm else ""
        if grant is not None and producer:
            owner = self.owners.get(producer)
            if owner is None:
                self._own(producer, grant.name)
            elif owner != grant.name:
                detail = f"forbidden: producer id {printable(producer)} belongs to another key"
                self._reject("forbidden", detail)
                return Outcome(Accepted(), [], error=detail)
            producer = f"{grant.name}/{producer}"  # its dedup state and journal entries
        first = batch.seq
        skip = 0
        high = 0
        if producer:
            if first < 1:
                detail = "confirm batches need producer seq >= 1"
                self._reject("bad_batch", detail)
                return Outcome(Accepted(), [], error=detail)
            # The sequence rule (docs/PROTOCOL.md 4): `high` only moves over seqs this
            # router settled itself, never over a claim. A known producer's `floor` is not
            # trusted at all (a forged one made the router ACK and drop a producer's next
            # events as resends); an unknown one's only up to the batch's own first seq.
            known = self.high.get(producer)
            high = known if known is not None else min(max(batch.floor, 1), first) - 1
            if first > high + 1:
                return self._gap(producer, first, high, len(batch.events))
            skip = high + 1 - first
        out = Outcome(Accepted(), [])
        acc = out.accepted
        wall = time.time()
        events = batch.events
        if skip > 0:
            out.duplicates = min(skip, len(events))
            self.duplicates_total += out.duplicates
            recent = self.recent_nacks.get(producer)
            if recent:
                out.nacks.extend(n for s, n in recent.items() if first <= s < first + out.duplicates)
        limiter = self.limiter if self.limiter.enabled else None
        max_bytes = self.max_event_bytes
        check_payload = self.contracts.check_payload
        decode = self._decode_event
        khash_of = self._khash_cache
        plain = self._plain_types  # types whose payload needs no per-event check
        good_sources = self._good_sources
        controls = CONTROL_RE.search
        types, khashes, accepted = acc.types, acc.khashes, acc.events
        pseqs: list[int] = []
        # accepted per (type, source) for the metrics, counted in runs: a batch is mostly
        # one type from one source, so per event this is two string compares, no dict
        counts = acc.counts
        run_type = run_source = ""
        run = 0
        bulk = self._bulk(frame, events) if skip <= 0 and grant is None and limiter is None and events else None
        if bulk is not None:  # every event passed: the columns at once
            acc.types, acc.khashes, acc.counts = bulk
            types, khashes = acc.types, acc.khashes
            accepted.extend(events)
        for i in range(max(skip, 0), len(events) if bulk is None else 0):
            raw = events[i]
            if len(raw) > max_bytes:
                self._nack(
                    out,
                    producer,
                    first + i,
                    "too_large",
                    f"event of {len(raw)} bytes exceeds max_event_bytes {max_bytes}",
                )
                continue
            try:
                ev = decode(raw)
            except DECODE_ERRORS as exc:
                self._nack(out, producer, first + i, "malformed", f"malformed event: {exc}")
                continue
            type_ = ev.type
            # control characters (issue 10 #12): a known key or source passed already
            source = ev.source
            if source not in good_sources:
                if controls(source) is not None:
                    self._nack(out, producer, first + i, "malformed", _CONTROLS + "$.source`", type_=type_)
                    continue
                if len(good_sources) >= KEY_CACHE:
                    good_sources.clear()
                good_sources.add(source)
            if grant is not None and not grant.may_send(source, type_):
                detail = f"key {grant.name} may not send {type_} from source {source}"
                self._nack(out, producer, first + i, "forbidden", detail, source, ev.id, type_=type_)
                continue
            key = ev.key
            if key is not None and key not in khash_of and controls(key) is not None:
                self._nack(out, producer, first + i, "malformed", _CONTROLS + "$.key`", source, ev.id, type_=type_)
                continue
            if ev.correlation_id is not None and controls(ev.correlation_id) is not None:
                self._nack(
                    out, producer, first + i, "malformed", _CONTROLS + "$.correlation_id`", source, ev.id, type_=type_
                )
                continue
            if (type_, ev.v) not in plain:
                try:
                    check_payload(type_, ev.v, ev.payload)
                except EventError as exc:
                    self._nack(out, producer, first + i, self._category(ev), str(exc), ev.source, ev.id, type_=type_)
                    continue
                if self.contracts.struct_for(type_, ev.v) is None and len(plain) < 10_000:
                    plain.add((type_, ev.v))  # allowed untyped: the same answer every time
            if limiter is not None:
                wait = limiter.check(ev.source, now)
                if wait > 0.0:
                    self._nack(
                        out,
                        producer,
                        first + i,
                        "rate_limited",
                        f"source {ev.source} is over its rate limit",
                        ev.source,
                        ev.id,
                        wait,
                        type_=type_,
                    )
                    continue
            key = partition_key(key, source)
            khash = khash_of.get(key)
            if khash is None:
                khash = key_hash(key)
                if len(khash_of) >= KEY_CACHE:
                    khash_of.clear()
                khash_of[key] = khash
            types.append(type_)
            khashes.append(khash)
            accepted.append(raw)
            pseqs.append(first + i)
            if type_ != run_type or source != run_source:
                if run:
                    counts[(run_type, run_source)] = counts.get((run_type, run_source), 0) + run
                run_type, run_source, run = type_, source, 0
            run += 1
        if run:
            counts[(run_type, run_source)] = counts.get((run_type, run_source), 0) + run
        if accepted:
            seqs = pseqs if bulk is None else range(first, first + len(events))
            acc.bodies = encode_entries(types, khashes, accepted, wall, producer=producer, pseqs=seqs)
        if events:
            out.ack = first + len(events) - 1
        else:  # an empty batch settles and moves nothing
            out.ack = min(first - 1, high) if producer else max(first - 1, 0)
        if producer and events:
            self.remember(producer, out.ack)
        self.accepted_total += len(acc.events)
        return out

    def _bulk(
        self, frame: bytes, events: list[msgspec.Raw]
    ) -> tuple[list[str], list[int], dict[tuple[str, str], int]] | None:
        """The common batch (no key to check against its grant, no rate limit, nothing
        resent) in bulk: every event decoded in one call and every check of the per-event
        path applied to the distinct sources, keys, correlation ids and (type, v) pairs.
        (types, partition key hashes, counts per (type, source)) when all pass; None when
        any fails: then the per-event path decides and NACKs exactly the bad events."""
        if max(map(len, events)) > self.max_event_bytes:
            return None
        try:
            evs = _decode_all(frame).events
        except DECODE_ERRORS:
            return None
        types = [ev.type for ev in evs]
        sources = [ev.source for ev in evs]
        keys = [ev.key for ev in evs]
        controls = CONTROL_RE.search
        good_sources, khash_of = self._good_sources, self._khash_cache
        for source in set(sources) - good_sources:
            if controls(source) is not None:
                return None
            if len(good_sources) >= KEY_CACHE:
                good_sources.clear()
            good_sources.add(source)
        distinct_keys = cast("set[str]", set(keys) - {None})
        if any(key not in khash_of and controls(key) is not None for key in distinct_keys):
            return None
        if any(cid is not None and controls(cid) is not None for cid in {ev.correlation_id for ev in evs}):
            return None
        plain = self._plain_types
        n = len(types)
        one_type = types.count(types[0]) == n  # a batch is mostly one type from one source
        versions = [ev.v for ev in evs]
        if one_type and versions.count(versions[0]) == n:
            kinds = {(types[0], versions[0])} - plain
        else:
            kinds = set(zip(types, versions, strict=True)) - plain
        if kinds:
            check_payload = self.contracts.check_payload
            try:
                for ev in evs:
                    if (ev.type, ev.v) in kinds:
                        check_payload(ev.type, ev.v, ev.payload)
            except EventError:
                return None
            for type_, v in kinds:
                if self.contracts.struct_for(type_, v) is None and len(plain) < 10_000:
                    plain.add((type_, v))  # allowed untyped: the same answer every time
        pkeys = sources if not distinct_keys else [partition_key(k, s) for k, s in zip(keys, sources, strict=True)]
        distinct = set(pkeys)
        missing = distinct.difference(khash_of)
        if missing:
            if len(khash_of) + len(missing) > KEY_CACHE:
                khash_of.clear()
                missing = distinct
            for key in missing:
                khash_of[key] = key_hash(key)
        if len(distinct) == 1:
            khashes = [khash_of[pkeys[0]]] * len(pkeys)
        else:
            khashes = [khash_of[k] for k in pkeys]
        if one_type and sources.count(sources[0]) == n:
            counts = {(types[0], sources[0]): n}
        else:
            counts = dict(collections.Counter(zip(types, sources, strict=True)))
        return types, khashes, counts

    def count_rejected(self, reason: str) -> None:
        """A message refused before intake could read it (bad frames, an internal error)."""
        self.rejected[reason] += 1
        self.rejected_by.inc((reason, "", ""))

    def journaled(self, accepted: list[Accepted]) -> None:
        """These accepted events are in the journal now: count them (per batch)."""
        inc = self.accepted_by.inc
        for acc in accepted:
            for key, n in acc.counts.items():
                inc(key, n)

    def storage_refused(self, accepted: list[Accepted], reason: str, detail: str) -> None:
        """The journal refused these accepted events: rejected with `reason` after all."""
        n = 0
        for acc in accepted:
            n += len(acc.bodies)
            for (type_, source), k in acc.counts.items():
                self.rejected_by.inc((reason, type_, source), k)
        self.accepted_total -= n
        self.rejected[reason] += n
        self.reject_log.append(
            {"time": time.time(), "reason": reason, "detail": detail[:300], "source": "", "id": "", "events": n}
        )

    def _gap(self, producer: str, first: int, high: int, n: int) -> Outcome:
        """Seqs before `first` never arrived (a lost batch, or numbering the router never
        saw): accept nothing, NACK each event as retryable and ACK only what is settled.
        The producer resends from high + 1, or renumbers from there (the SDK does when
        its oldest unacked seq is above high + 1: what lies between was settled for it
        by NACKs a restarted router does not remember)."""
        detail = f"expected producer seq {high + 1}, got {first}"
        self._reject("sequence_gap", f"producer {printable(producer)}: {detail}")
        reason = f"sequence_gap: {detail}"
        return Outcome(Accepted(), [Nack(first + i, reason) for i in range(n)], ack=high)

    def _category(self, ev) -> str:
        if self.contracts.struct_for(ev.type, ev.v):
            return "contract"
        return "unknown_type" if TYPE_RE.match(ev.type) else "malformed"

    def _nack(
        self,
        out: Outcome,
        producer: str,
        pseq: int,
        category: str,
        detail: str,
        source: str = "",
        event_id: str = "",
        retry_after: float = 0.0,
        type_: str = "",
    ) -> None:
        self._reject(category, detail, source, event_id, type_)
        nack = Nack(pseq, f"{category}: {detail}", retry_after)
        out.nacks.append(nack)
        if producer:
            self._remember_nack(producer, nack)

    def refuse(self, acc: Accepted, reason: str, retry_after: float) -> list[Nack]:
        """The journal refused these accepted events: NACK each, and remember the NACKs
        like any other, because `high` already moved over their seqs: a resend (the
        reply was lost) must get the same NACK, not an ACK as a duplicate (review #1)."""
        nacks = []
        for body in acc.bodies:
            entry = entry_decoder.decode(body)
            nack = Nack(entry.pseq, reason, retry_after)
            nacks.append(nack)
            if entry.producer:
                self._remember_nack(entry.producer, nack)
        return nacks

    def _remember_nack(self, producer: str, nack: Nack) -> None:
        recent = self.recent_nacks.setdefault(producer, collections.OrderedDict())
        recent[nack.seq] = nack
        if len(recent) > RECENT_NACKS:
            recent.popitem(last=False)
        if len(self.recent_nacks) > MAX_PRODUCERS:
            self.recent_nacks.pop(next(iter(self.recent_nacks)))
