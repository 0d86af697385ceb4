"""Cluster-side queries and changes the admin (nexus/jsingest/admin.py) and the CLI share
under `engine: nats`: stream facts, the KV records, lag per partition, events by
position, dead letters, and the partition resets of `nexus journal replay`.

Every function takes the JetStream context and the pipeline's Names and holds no state:
the cluster is the truth, read afresh on each request.
"""

from __future__ import annotations

import asyncio
import datetime
import fnmatch
import json
import time
from typing import Any

import msgspec
from nats.aio.client import Client
from nats.errors import TimeoutError as NatsTimeout
from nats.js import JetStreamContext, api
from nats.js.errors import KeyWrongLastSequenceError, NotFoundError

from nexus.jetstream import names as hdr
from nexus.jetstream.names import Names
from nexus.jetstream.records import GroupRecord, MemberRecord, OwnerRecord, encoder
from nexus.protocol.events import decode_wire_event
from nexus.protocol.wire import Journaled

READ_BUDGET = 0.3  # seconds one Read may spend on direct gets
BATCH = 256  # messages one batched direct get asks for
BATCH_WAIT = 5.0  # seconds a batched direct get's next message may take
LAG_PROBE_INACTIVE = 5.0  # seconds: a lag probe's ephemeral consumer outlives a dead caller by this
CAS_TRIES = 5  # a member rewriting an owner record meanwhile: read it again, this many times


# -- the streams ------------------------------------------------------------------------------
async def stream_facts(js: JetStreamContext, names: Names) -> dict[str, Any]:
    """The events stream as status shows it: leader, replicas, messages, bytes, seqs."""
    info = await js.stream_info(names.stream)
    state, cluster = info.state, info.cluster
    replicas = [
        {"name": p.name, "current": bool(p.current), "offline": bool(p.offline), "lag": p.lag or 0}
        for p in (cluster.replicas or [] if cluster else [])
    ]
    return {
        "stream": names.stream,
        "cluster": cluster.name if cluster else None,
        "leader": cluster.leader if cluster else None,
        "replicas": replicas,  # the followers; the leader is current by definition
        "replicas_configured": info.config.num_replicas or 1,
        "messages": state.messages,
        "bytes": state.bytes,
        "first_seq": state.first_seq,
        "last_seq": state.last_seq,
        "consumers": state.consumer_count,
    }


async def subject_counts(js: JetStreamContext, stream: str, subjects: str) -> dict[str, int]:
    """Messages per subject matching `subjects` (a wildcard) in `stream`."""
    info = await js.stream_info(stream, subjects_filter=subjects)
    return dict(info.state.subjects or {})


async def seq_at_time(js: JetStreamContext, names: Names, when: float) -> int:
    """The first events-stream seq stored at or after unix time `when` (last + 1: none)."""
    start = datetime.datetime.fromtimestamp(when, tz=datetime.UTC)
    info = await js.add_consumer(
        names.stream,
        api.ConsumerConfig(
            deliver_policy=api.DeliverPolicy.BY_START_TIME,
            opt_start_time=start,
            ack_policy=api.AckPolicy.NONE,
            inactive_threshold=LAG_PROBE_INACTIVE,
            mem_storage=True,
            num_replicas=1,
        ),
    )
    try:
        last = (await js.stream_info(names.stream)).state.last_seq
        # the consumer starts at the first message at or after the time: its pending
        # count says how many are left, so the first one is last - pending + 1
        return last - (info.num_pending or 0) + 1
    finally:
        await _delete_consumer(js, names.stream, info.name)


async def _delete_consumer(js: JetStreamContext, stream: str, name: str) -> None:
    try:
        await js.delete_consumer(stream, name)
    except NotFoundError:
        pass


# -- the KV bucket ----------------------------------------------------------------------------
async def kv_entries(js: JetStreamContext, names: Names, keys: str = ">") -> dict[str, tuple[bytes, int]]:
    """Every live key matching `keys` with its value and revision (deleted ones left out)."""
    kv = await js.key_value(names.bucket)
    watcher = await kv.watch(keys, ignore_deletes=True)
    out: dict[str, tuple[bytes, int]] = {}
    try:
        while True:
            entry = await watcher.updates(timeout=5.0)
            if entry is None:  # the initial values are all in
                return out
            out[entry.key] = (entry.value or b"", entry.revision or 0)
    finally:
        await watcher.stop()


def decode_members(entries: dict[str, tuple[bytes, int]], group: str) -> list[MemberRecord]:
    from nexus.jetstream.records import member_decoder

    prefix = f"m.{group}."
    found = []
    for key, (value, _rev) in sorted(entries.items()):
        if key.startswith(prefix):
            try:
                found.append(member_decoder.decode(value))
            except msgspec.MsgspecError:
                continue  # a record no member of ours wrote: not a member
    return found


def decode_owner(entries: dict[str, tuple[bytes, int]], group: str, p: int) -> OwnerRecord | None:
    from nexus.jetstream.records import owner_decoder

    found = entries.get(Names.owner_key(group, p))
    try:
        return owner_decoder.decode(found[0]) if found else None
    except msgspec.MsgspecError:
        return None


def decode_group(entries: dict[str, tuple[bytes, int]], group: str) -> GroupRecord | None:
    from nexus.jetstream.records import group_decoder

    found = entries.get(Names.group_key(group))
    try:
        return group_decoder.decode(found[0]) if found else None
    except msgspec.MsgspecError:
        return None


# -- lag --------------------------------------------------------------------------------------
async def partition_lag(
    js: JetStreamContext,
    names: Names,
    group: str,
    p: int,
    partitions: int,
    owner: OwnerRecord | None,
    start: GroupRecord | None,
) -> int | str:
    """Events of partition p not acked yet: its consumer's pending + unacked; without a
    consumer, the events in its subjects from where the next one would start."""
    if owner is not None and owner.consumer and not owner.reset_to:
        try:
            info = await js.consumer_info(names.stream, owner.consumer)
            return (info.num_pending or 0) + (info.num_ack_pending or 0)
        except NotFoundError:
            pass  # being replaced: count from where the next starts
    begin = (owner.reset_to or owner.start_seq) if owner is not None else 0
    begin = begin or (start.start_seq if start is not None else 0)
    if not begin:
        return "unknown"  # no member has started the group yet
    return await count_from(js, names.stream, names.partition_subjects(group, p, partitions), begin)


async def count_from(js: JetStreamContext, stream: str, subjects: list[str], seq: int) -> int:
    """Messages at or after `seq` in `subjects` (an ephemeral consumer's pending count)."""
    info = await js.add_consumer(
        stream,
        api.ConsumerConfig(
            filter_subjects=subjects,
            deliver_policy=api.DeliverPolicy.BY_START_SEQUENCE,
            opt_start_seq=max(1, seq),
            ack_policy=api.AckPolicy.NONE,
            inactive_threshold=LAG_PROBE_INACTIVE,
            mem_storage=True,
            num_replicas=1,
        ),
    )
    await _delete_consumer(js, stream, info.name)
    return info.num_pending or 0


# -- batched direct gets -----------------------------------------------------------------------
def _stamp(text: str) -> datetime.datetime | None:
    """Nats-Time-Stamp (RFC 3339 with nanoseconds) as a datetime (microseconds)."""
    head, _, frac = text.rstrip("Z").partition(".")
    try:
        return datetime.datetime.fromisoformat(f"{head}.{(frac + '000000')[:6]}+00:00")
    except ValueError:
        return None


async def direct_batch(
    nc: Client, stream: str, seq: int, subject: str, batch: int = BATCH, max_bytes: int = 0
) -> list[api.RawStreamMsg]:
    """Up to `batch` messages of `subject` from `seq` on, in one direct get (any replica
    answers: reads do not load the leader); fewer at the end of the stream."""
    inbox = nc.new_inbox()
    sub = await nc.subscribe(inbox)
    req: dict[str, Any] = {"seq": max(1, seq), "batch": batch, "next_by_subj": subject}
    if max_bytes:
        req["max_bytes"] = max_bytes
    out: list[api.RawStreamMsg] = []
    try:
        await nc.publish(f"$JS.API.DIRECT.GET.{stream}", json.dumps(req).encode(), reply=inbox)
        while True:
            msg = await sub.next_msg(timeout=BATCH_WAIT)
            headers = msg.headers or {}
            if "Status" in headers:  # 204 end of batch, 404 nothing from seq on
                return out
            out.append(
                api.RawStreamMsg(
                    subject=headers.get("Nats-Subject"),
                    seq=int(headers.get("Nats-Sequence", 0)),
                    data=msg.data,
                    headers=headers,
                    time=_stamp(headers.get("Nats-Time-Stamp", "")),
                )
            )
    finally:
        await sub.unsubscribe()


# -- events by position (gateway /v1/subscribe, `nexus tail`) ---------------------------------
async def read_events(
    nc: Client, js: JetStreamContext, names: Names, after: int, limit: int, types: list[str], max_bytes: int
) -> Journaled:
    """Events of the shared subjects (not a group's replays) after `after` whose type
    matches a glob of `types` (none: all), bounded by `limit`, `max_bytes` (at least one
    event) and READ_BUDGET; `upto` says how far this answer looked."""
    state = (await js.stream_info(names.stream)).state
    first, last = state.first_seq, state.last_seq
    after = max(0, after)
    if limit <= 0 or after >= last:
        return Journaled(after=after, upto=after, first=first, last=last)
    seqs: list[int] = []
    events: list[msgspec.Raw] = []
    size, upto, seq = 0, after, max(after + 1, first)
    deadline = time.monotonic() + READ_BUDGET
    shared = f"{names.prefix}.ev.*"
    full = False
    while not full and seq <= last and time.monotonic() < deadline:
        batch = await direct_batch(nc, names.stream, seq, shared, BATCH, max_bytes)
        if not batch:
            upto = last  # nothing more of the shared subjects
            break
        for msg in batch:
            found, data = msg.seq or seq, msg.data or b""
            if found > last or (max_bytes and seqs and size + len(data) > max_bytes):
                full = True
                break
            upto, seq = found, found + 1
            try:
                ev = decode_wire_event(data)
            except (msgspec.MsgspecError, UnicodeDecodeError, RecursionError):
                continue  # not an event (the ingest stores only valid ones): passed over
            if types and not any(fnmatch.fnmatchcase(ev.type, g) for g in types):
                continue
            seqs.append(found)
            events.append(msgspec.Raw(data))
            size += len(data)
            if len(seqs) >= limit:
                full = True
                break
    return Journaled(after=after, upto=max(upto, after), first=first, last=last, seqs=seqs, events=events)


# -- dead letters -----------------------------------------------------------------------------
def _header(msg: api.RawStreamMsg, name: str, default: str = "") -> str:
    return (msg.headers or {}).get(name, default)


def dead_letter_row(msg: api.RawStreamMsg) -> dict[str, Any]:
    """A dead letter as `nexus dlq` shows it (the embedded store's row keys)."""
    error_type, _, error = _header(msg, hdr.H_ERROR).partition(": ")
    when = msg.time.timestamp() if msg.time else 0.0
    row: dict[str, Any] = {
        "id": msg.seq,
        "group": _header(msg, hdr.H_GROUP),
        "seq": int(_header(msg, hdr.H_SEQ, "0") or 0),
        "partition": int(_header(msg, hdr.H_PARTITION, "0") or 0),
        "member": _header(msg, "Nexus-Member"),
        "attempts": int(_header(msg, hdr.H_ATTEMPTS, "0") or 0),
        "failures": 1,
        "status": "dead",
        "error_type": error_type,
        "error": error,
        "traceback": "",
        "first_failed": when,
        "last_failed": when,
        "event_id": "",
        "type": "",
        "source": "",
    }
    try:
        ev = decode_wire_event(msg.data or b"")
        row.update(event_id=ev.id, type=ev.type, source=ev.source)
    except (msgspec.MsgspecError, UnicodeDecodeError, RecursionError):
        row["event_id"] = f"unreadable-{row['seq']}"
    return row


def dlq_filter(names: Names, group: str | None) -> str:
    return names.dlq_subject(group) if group else names.dlq_subjects()[0]


async def dead_letter_msgs(
    nc: Client,
    js: JetStreamContext,
    names: Names,
    group: str | None,
    after: int = 0,
    limit: int = 0,
    upto: int = 0,
) -> list[api.RawStreamMsg]:
    """Dead letters with id in (`after`, `upto`] (0: to the end) of `group` (None: all),
    oldest first, at most `limit` (0: all)."""
    subject = dlq_filter(names, group)
    state = (await js.stream_info(names.dlq_stream)).state
    end = min(upto, state.last_seq) if upto else state.last_seq
    out: list[api.RawStreamMsg] = []
    seq = max(after + 1, state.first_seq)
    while seq <= end and (not limit or len(out) < limit):
        batch = await direct_batch(nc, names.dlq_stream, seq, subject, min(BATCH, limit - len(out)) if limit else BATCH)
        out += [m for m in batch if (m.seq or 0) <= end][: (limit - len(out)) if limit else None]
        if not batch or (batch[-1].seq or 0) >= end:
            break
        seq = (batch[-1].seq or seq) + 1
    return out


async def dead_letters_between(js: JetStreamContext, names: Names, group: str | None, after: int, upto: int) -> int:
    """How many dead letters of `group` (None: all) have an id in (`after`, `upto`]."""
    if upto <= after:
        return 0
    subjects = [dlq_filter(names, group)]
    return await count_from(js, names.dlq_stream, subjects, after + 1) - await count_from(
        js, names.dlq_stream, subjects, upto + 1
    )


async def dead_letter_msg(js: JetStreamContext, names: Names, dlq_id: int) -> api.RawStreamMsg | None:
    try:
        msg = await js.get_msg(names.dlq_stream, seq=dlq_id, direct=True)
    except NotFoundError:
        return None
    return msg if msg.seq == dlq_id else None


async def replay_dead_letter(js: JetStreamContext, names: Names, msg: api.RawStreamMsg) -> int:
    """Publish the event again for its group only, then delete the dead letter; the
    message id makes a replay repeated after a failed delete a duplicate, not a second
    copy. Returns the event's new seq in the events stream."""
    group = _header(msg, hdr.H_GROUP)
    data = msg.data or b""
    ev = decode_wire_event(data)
    shard = names.shard_of(ev.key, ev.source)
    ack = await js.publish(names.replay_subject(group, shard), data, headers={hdr.MSG_ID: f"replay-{msg.seq}"})
    await js.delete_msg(names.dlq_stream, msg.seq or 0)
    return ack.seq


async def dead_letter_counts(js: JetStreamContext, names: Names) -> dict[str, int]:
    prefix = f"{names.prefix}.dlq."
    counts = await subject_counts(js, names.dlq_stream, names.dlq_subjects()[0])
    return {subject.removeprefix(prefix): n for subject, n in counts.items()}


# -- resets (`nexus journal replay`) ----------------------------------------------------------
async def reset_partition(js: JetStreamContext, names: Names, group: str, p: int, from_seq: int) -> None:
    """The next owner of partition p starts at `from_seq`: the owner record says so
    (compare-and-set on its revision) and its consumer goes; the owner sees its record
    change and stops the partition without acking."""
    from nexus.jetstream.records import owner_decoder

    kv = await js.key_value(names.bucket)
    key = Names.owner_key(group, p)
    for _ in range(CAS_TRIES):
        try:
            entry = await kv.get(key)
            old = owner_decoder.decode(entry.value or b"") if entry.value else OwnerRecord()
            rev = entry.revision
        except NotFoundError:  # (KeyNotFoundError and KeyDeletedError both are)
            old, rev = OwnerRecord(), None
        upto = old.redeliver_upto
        if old.consumer:
            try:
                info = await js.consumer_info(names.stream, old.consumer)
                upto = max(upto, info.delivered.stream_seq if info.delivered else 0)
            except NotFoundError:
                pass
        new = msgspec.structs.replace(
            old, member="", consumer="", reset_to=max(1, from_seq), redeliver_upto=upto, released=False
        )
        try:
            if rev is None:
                await kv.create(key, encoder.encode(new))
            else:
                await kv.update(key, encoder.encode(new), last=rev)
        except KeyWrongLastSequenceError:
            continue  # changed (or made) meanwhile by an owner: again, on the new record
        if old.consumer:
            await _delete_consumer(js, names.stream, old.consumer)
        return
    raise RuntimeError(f"partition {p} of group {group} kept changing; replay again")


async def add_skips(js: JetStreamContext, names: Names, group: str, p: int, seqs: list[int]) -> None:
    """Have partition p's owners pass over `seqs` (dead-lettered poison): added to its
    owner record's `skip` (compare-and-set), the current owner sees its record change."""
    from nexus.jetstream.records import SKIP_KEPT, owner_decoder

    kv = await js.key_value(names.bucket)
    key = Names.owner_key(group, p)
    for _ in range(CAS_TRIES):
        try:
            entry = await kv.get(key)
            old = owner_decoder.decode(entry.value or b"") if entry.value else OwnerRecord()
            rev = entry.revision
        except NotFoundError:
            old, rev = OwnerRecord(), None
        skip = sorted(set(old.skip) | set(seqs))[-SKIP_KEPT:]
        if skip == old.skip:
            return
        value = encoder.encode(msgspec.structs.replace(old, skip=skip))
        try:
            await (kv.create(key, value) if rev is None else kv.update(key, value, last=rev))
            return
        except KeyWrongLastSequenceError:
            continue
    raise RuntimeError(f"partition {p} of group {group} kept changing; poison not marked")


# -- members -----------------------------------------------------------------------------------
async def delete_member(js: JetStreamContext, names: Names, group: str, name: str, pid: int, host: str) -> list[str]:
    """Delete the KV records of `group`'s member called `name` on `host` (with `pid`
    when known): the others rebalance at once instead of waiting for missed beats."""
    entries = await kv_entries(js, names, f"m.{group}.*")
    kv = await js.key_value(names.bucket)
    gone = []
    for m in decode_members(entries, group):
        if m.name == name and m.host == host and (not pid or m.pid == pid):
            await kv.delete(Names.member_key(group, m.member))
            gone.append(m.member)
    return gone


async def event_at(js: JetStreamContext, names: Names, seq: int) -> api.RawStreamMsg | None:
    try:
        return await js.get_msg(names.stream, seq=seq, direct=True)
    except NotFoundError:
        return None


async def gather_bounded(coros: list, timeout: float) -> list:
    """Run `coros` together; a slow cluster fails the whole request after `timeout`."""
    return await asyncio.wait_for(asyncio.gather(*coros), timeout)


UNREACHABLE = (NatsTimeout, asyncio.TimeoutError, ConnectionError)
