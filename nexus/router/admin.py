"""Router requests from the CLI and the launcher (status, metrics, journal replay, dead
letters, member exits, reload), kept apart from the router's hot path.

Admin reaches the router only through `RouterSurface`: the router's parts (read, or
used through their public methods) and four methods of the router's own: lag,
send_coord, commit_replayed and apply_live. It never imports the server (which
imports admin): the server's `Router` meets the protocol as it is.
"""

from __future__ import annotations

import os
import sqlite3
import time
from typing import Any, Protocol

import msgspec
import structlog

from nexus import config as config_mod
from nexus.common import logs
from nexus.config import Config
from nexus.errors import ConfigError, describe_exit
from nexus.protocol.events import decode_wire_event
from nexus.protocol.gatekeeper import Gatekeeper
from nexus.protocol.partitions import key_hash, partition_key
from nexus.protocol.wire import (
    Coord,
    DeadLetter,
    DeadLetterStored,
    DlqRequest,
    MemberExited,
    MetricsRequest,
    ReloadRequest,
    ReplayRequest,
    StatusRequest,
)
from nexus.router import livegroups
from nexus.router.coordinator import Coordinator, Group
from nexus.router.cursors import CursorStore
from nexus.router.deadletters import DeadLetterStore, DeadLetterWriter, PendingDeadLetter
from nexus.router.flusher import Flusher
from nexus.router.intake import Accepted, Intake
from nexus.router.journal import Journal, encode_entries, entry_decoder
from nexus.router.storage import StorageState
from nexus.router.telemetry import RouterTelemetry

log = structlog.get_logger("nexus.router")

LIST_LIMIT = 1000  # rows `dlq list` returns (its reply's "total" counts them all)

AdminRequest = StatusRequest | ReplayRequest | DlqRequest | ReloadRequest | MetricsRequest


class RouterSurface(Protocol):
    """What admin uses of the router (nexus/router/server.py `Router`): admin assigns
    none of these attributes; it changes the router only through the methods."""

    config: Config
    env: str | None
    started: float  # wall time
    intake: Intake
    journal: Journal
    coordinator: Coordinator
    cursors: CursorStore
    flusher: Flusher
    storage: StorageState
    dlq: DeadLetterStore  # the loop's connection: reads and operator purges
    dlq_writer: DeadLetterWriter  # the thread that stores dead letters
    member_stats: dict[tuple[str, str], dict]
    member_metrics: dict[tuple[str, str], dict]  # each member's last metrics snapshot (heartbeats)
    telemetry: RouterTelemetry
    tail_subscribers: int
    cursor_past_end: list[dict]
    gatekeeper: Gatekeeper | None  # CURVE on: its keys and refusal counts

    def lag(self, group: Group) -> int | str: ...

    def send_coord(self, identity: bytes, msg: Coord) -> None: ...

    def commit_replayed(self, accepted: Accepted, group: str) -> int: ...

    def apply_live(self, fresh: Config) -> dict: ...


def handle(router: RouterSurface, msg: AdminRequest) -> dict:
    try:
        return _handle(router, msg)
    except OSError as exc:  # a journal or cursor write on a full or failing disk
        return {"error": f"storage unavailable: {exc}"}


def _handle(router: RouterSurface, msg: AdminRequest) -> dict:
    if isinstance(msg, StatusRequest):
        return status(router)
    if isinstance(msg, ReplayRequest):
        return replay(router, msg)
    if isinstance(msg, DlqRequest):
        return dlq(router, msg)
    if isinstance(msg, ReloadRequest):
        return reload(router, msg.config)
    if isinstance(msg, MetricsRequest):
        return metrics(router)
    return {"error": f"unsupported request {type(msg).__name__}"}


def status(router: RouterSurface) -> dict:
    """Cheap by design (it is the launcher's readiness probe): nothing here reads the
    journal; lag comes from the router's incremental backlog."""
    try:
        dead = router.dlq.counts()
    except sqlite3.OperationalError:  # locked by another process: status still answers
        dead = {}
    groups = {}
    for name, g in router.coordinator.groups.items():
        members = []
        for m in g.members.values():
            stats = router.member_stats.get((name, m.name), {})
            members.append({"name": m.name, "host": m.host, "pid": m.pid, "partitions": list(m.view), **stats})
        groups[name] = {
            "partitions": g.partitions,
            "members": members,
            "unassigned": sum(1 for o in g.owner if o is None),
            "lag": router.lag(g),
            "cursor_min": min(g.cursors) if g.cursors else 0,
            "dead_letters": dead.get(name, 0),
        }
    intake = router.intake
    return {
        "router": {
            "pid": os.getpid(),
            "uptime": round(time.time() - router.started, 1),
            "accepted": intake.accepted_total,
            "rejected": sum(intake.rejected.values()),
            "rejected_by_reason": dict(intake.rejected),
            "duplicates": intake.duplicates_total,
            "tail_subscribers": router.tail_subscribers,
            "seq": router.journal.last_seq,
            "journal": {**router.journal.info(), "cursor_past_end": router.cursor_past_end},
            "storage": router.storage.describe(),
            "dead_letter_writer": router.dlq_writer.describe(),
            "rate_limits": intake.limiter.describe(),
            "recent_rejects": list(intake.reject_log)[-10:],
            "cursor_file_damaged": router.cursors.damage,  # None unless found damaged at start
            "security": router.gatekeeper.status() if router.gatekeeper is not None else {"curve": False},
        },
        "groups": groups,
    }


def metrics(router: RouterSurface) -> dict:
    """The router's snapshot and each current member's last one (from its heartbeats):
    a member that left (or was dropped) is forgotten here, so its series end."""
    members = {}
    current = {(name, m) for name, g in router.coordinator.groups.items() for m in g.members}
    for key in list(router.member_metrics):
        if key in current:
            members[f"{key[0]}/{key[1]}"] = router.member_metrics[key]
        else:
            del router.member_metrics[key]
    return {"router": router.telemetry.snapshot(), "members": members}


def recovering_status(router: RouterSurface) -> dict:
    """Status while the router still reads its journal at start."""
    journal = router.journal
    return {
        "router": {
            "pid": os.getpid(),
            "uptime": round(time.time() - router.started, 1),
            "recovering": True,
            "recovered_records": journal.recovery.records,
            "accepted": 0,
            "rejected": 0,
            "rejected_by_reason": {},
            "duplicates": 0,
            "tail_subscribers": 0,
            "seq": journal.last_seq,
            "journal": {**journal.info(), "cursor_past_end": []},
            "storage": router.storage.describe(),
            # the limits are configured before recovery starts; report them, not {}
            "rate_limits": router.intake.limiter.describe(),
            "recent_rejects": [],
            "security": router.gatekeeper.status() if router.gatekeeper is not None else {"curve": False},
        },
        # no members yet (they join once recovery is done): readiness waits for them
        "groups": {
            name: {
                "partitions": g.partitions,
                "members": [],
                "unassigned": g.partitions,
                "lag": "recovering",
                "cursor_min": 0,
                "dead_letters": 0,
            }
            for name, g in router.config.workers.items()
        },
    }


def replay(router: RouterSurface, msg: ReplayRequest) -> dict:
    group = router.coordinator.groups.get(msg.group)
    if group is None:
        return {"error": f"unknown group {msg.group!r}"}
    journal = router.journal
    if msg.from_time:
        from_seq = journal.seq_at_time(msg.from_time) + 1
    else:
        from_seq = max(msg.from_seq, journal.first_seq())
    from_seq = min(from_seq, journal.last_seq + 1)
    for identity, out in router.coordinator.replay(group, from_seq - 1):
        router.send_coord(identity, out)
    router.flusher.save_now(router.coordinator.cursor_snapshot())
    log.warning("journal_replay", group=group.name, from_seq=from_seq, last_seq=journal.last_seq)
    return {"group": group.name, "from_seq": from_seq, "last_seq": journal.last_seq, "events": router.lag(group)}


# -- dead letters ---------------------------------------------------------------------
def store_dead_letter(router: RouterSurface, msg: DeadLetter, identity: bytes) -> None:
    """Hand the dead letter to the writer thread; the member hears `DeadLetterStored`
    once it is written (see `dead_letters_written`) and only then acks the event.

    The row keeps the journal's copy of the event, never the member's: `nexus dlq replay`
    journals it again, and a member key must not be able to journal events it made up
    (bypassing contracts and the producers' grants). A seq the journal does not hold
    (past its end, or already removed by retention) is not stored; the member is told
    it was, so its partition moves on, and the operator sees the error line."""
    records = router.journal.read(msg.seq - 1, 1) if msg.seq >= 1 else []
    if not records or records[0][0] != msg.seq:
        log.error(
            "dead_letter_not_in_journal",
            group=msg.group,
            seq=msg.seq,
            member=msg.member,
            error=f"{msg.error_type}: {msg.error}",
            reason="the journal has no such event (removed by retention, or never there); not stored",
        )
        router.send_coord(identity, DeadLetterStored(msg.group, msg.partition, msg.seq))
        return
    raw = bytes(entry_decoder.decode(records[0][1]).event)
    try:
        ev = decode_wire_event(raw)
    except (msgspec.MsgspecError, UnicodeDecodeError, RecursionError):
        log.error("dead_letter_unreadable", group=msg.group, seq=msg.seq)
        return
    try:  # (the member re-encodes what it decoded: compare ids, not bytes)
        claimed = decode_wire_event(msg.event).id
    except (msgspec.MsgspecError, UnicodeDecodeError, RecursionError):
        claimed = "unreadable"
    if claimed != ev.id:
        log.warning(
            "dead_letter_event_differs", group=msg.group, seq=msg.seq, member=msg.member, claimed=claimed, kept=ev.id
        )
    router.dlq_writer.submit(
        PendingDeadLetter(
            dict(
                group=msg.group,
                event_id=ev.id,
                type=ev.type,
                source=ev.source,
                seq=msg.seq,
                partition=msg.partition,
                member=msg.member,
                error_type=msg.error_type,
                error=msg.error,
                traceback=msg.traceback,
                attempts=msg.attempts,
                first_failed=msg.first_failed,
                event=raw,
            ),
            reply_to=identity,
        )
    )


def dead_letters_written(router: RouterSurface) -> None:
    """From the router loop: confirm what the writer thread stored."""
    done = router.dlq_writer.done
    while done:
        item = done.popleft()
        if item.replayed:
            continue  # a replay's mark, written late (logged by the writer if it failed)
        f = item.fields
        if item.error:
            continue  # not stored: the member sends it again (logged by the writer)
        if item.tag is not None:  # poison: its partition may move on now
            _poison_settled(router, *item.tag)
        log.error(
            "event_dead_lettered",
            group=f["group"],
            event_id=f["event_id"],
            type=f["type"],
            seq=f["seq"],
            dlq_id=item.row,
            error=f"{f['error_type']}: {f['error']}",
        )
        if item.reply_to is not None:
            router.send_coord(item.reply_to, DeadLetterStored(f["group"], f["partition"], f["seq"]))


def member_exited(router: RouterSurface, group, msg: MemberExited, now: float) -> dict:
    """The launcher saw a member die: free its partitions now, dead-letter the poison it
    names (read from the journal by seq) and make the next owners pass over it."""
    router.coordinator.suspect(group, msg.inflight, msg.poison)  # before exited() grants them
    for identity, out in router.coordinator.exited(group, msg.member, msg.pid, msg.poison, now):
        router.send_coord(identity, out)
    how = describe_exit(msg.exit_code)
    timeout = msg.reason == "handler_timeout"
    dead = []
    for p, seqs in msg.poison.items():
        for seq in seqs:
            records = router.journal.read(seq - 1, 1)
            if not records or records[0][0] != seq:
                log.error("poison_not_in_journal", group=group.name, seq=seq)
                _poison_settled(router, group.name, p, seq)  # no member can get it either
                continue
            raw = bytes(entry_decoder.decode(records[0][1]).event)
            try:
                ev = decode_wire_event(raw)
                event_id, type_, source = ev.id, ev.type, ev.source
            except (msgspec.MsgspecError, UnicodeDecodeError, RecursionError):
                event_id, type_, source = f"unreadable-{seq}", "", ""  # still stored, as it is
            error = (
                f"member {msg.member} ran past handler_timeout on this event ({how}), the limit of timeouts was reached"
                if timeout
                else f"member {msg.member} died on this event ({how}); it killed members max_crashes times"
            )
            # the skip is applied once the row is stored (dead_letters_written): until then no
            # one runs the partition, and a router stopping before has not skipped it
            router.dlq_writer.submit(
                PendingDeadLetter(
                    dict(
                        group=group.name,
                        event_id=event_id,
                        type=type_,
                        source=source,
                        seq=seq,
                        partition=p,
                        member=msg.member,
                        error_type="HandlerTimeout" if timeout else "ProcessCrashed",
                        error=error,
                        traceback="",
                        attempts=0,
                        first_failed=time.time(),
                        event=raw,
                    ),
                    tag=(group.name, p, seq),
                )
            )
            dead.append(seq)
    return {"ok": True, "dead_lettered": dead}


def _poison_settled(router: RouterSurface, group_name: str, partition: int, seq: int) -> None:
    group = router.coordinator.groups.get(group_name)
    if group is not None:
        for identity, out in router.coordinator.poison_stored(group, partition, seq, time.monotonic()):
            router.send_coord(identity, out)


def restore_skips(router: RouterSurface) -> None:
    """On start: poison dead-lettered before stays passed over (its partition's cursor
    may not have moved past it when the router stopped)."""
    for grp, partition, seq in router.dlq.poison():
        group = router.coordinator.groups.get(grp)
        if group is not None and 0 <= partition < group.partitions and seq > group.cursors[partition]:
            group.skip.setdefault(partition, set()).add(seq)


def dlq(router: RouterSurface, msg: DlqRequest) -> dict:
    try:
        return _dlq(router, msg)
    except sqlite3.OperationalError as exc:
        # the loop's connection waits 0.5 s at most: another process holds the database
        return {"error": f"dead-letter store busy ({exc}); try again"}


def _dlq(router: RouterSurface, msg: DlqRequest) -> dict:
    store = router.dlq
    if msg.group is not None and msg.group not in router.coordinator.groups:
        return {"error": f"unknown group {msg.group!r}"}
    if msg.action == "list":
        rows = store.list(group=msg.group, type=msg.type, limit=LIST_LIMIT)
        # the listing is capped; the count says how many there are in all
        total = len(rows) if len(rows) < LIST_LIMIT else store.count(group=msg.group, type=msg.type)
        return {"dead_letters": rows, "total": total}
    if msg.action == "show":
        found = store.get(msg.ids[0]) if msg.ids else None
        if found is None:
            return {"error": f"no dead letter with id {msg.ids[0] if msg.ids else '?'}"}
        row, raw = found
        ev = decode_wire_event(raw)
        row["event"] = {
            "id": ev.id,
            "type": ev.type,
            "source": ev.source,
            "key": ev.key,
            "time": ev.time,
            "priority": ev.priority,
            "correlation_id": ev.correlation_id,
            "v": ev.v,
            "payload": msgspec.msgpack.decode(ev.payload),
        }
        return {"dead_letter": row}
    if msg.action == "replay":
        return _replay_dead_letters(router, msg)
    if msg.action == "purge":
        if not (msg.ids or msg.group or msg.all):
            return {"error": "purge needs ids, --group G or --all"}
        return {"purged": store.purge(group=msg.group, row_ids=msg.ids or None)}
    return {"error": f"unknown dlq action {msg.action!r}"}


def _replay_dead_letters(router: RouterSurface, msg: DlqRequest) -> dict:
    """Journal the events again, for their group only; each succeeds or comes back."""
    store = router.dlq
    page: dict[str, int] = {}
    if msg.ids:
        rows = [found for i in msg.ids if (found := store.get(i)) is not None]
        missing = sorted(set(msg.ids) - {r["id"] for r, _ in rows})
        if missing:
            return {"error": f"no dead letter with id {', '.join(map(str, missing))}"}
    elif msg.group or msg.all:
        # every matching row (limit 0), or one page of them: the CLI pages with `after` so
        # its progress moves and no single request stalls the loop. Paging by id, not by
        # status: a replayed event that fails again keeps its row id, so it is not replayed
        # twice in one run. (A row purged meanwhile by another process is left out.)
        listed = store.list(group=msg.group, type=msg.type, limit=msg.limit or None, after=msg.after)
        rows = [found for r in listed if (found := store.get(r["id"])) is not None]
        if msg.limit:  # a page: where the next starts, and how many are left after it
            last = listed[-1]["id"] if listed else msg.after
            page = {"next_after": last, "remaining": store.count(group=msg.group, type=msg.type, after=last)}
    else:
        return {"error": "replay needs ids, --group G or --all"}
    by_group: dict[str, list[tuple[dict[str, Any], bytes]]] = {}
    for row, raw in rows:
        if row["group"] in router.coordinator.groups:
            by_group.setdefault(row["group"], []).append((row, raw))
    replayed = []
    now = time.time()
    for group, items in by_group.items():
        acc = Accepted()
        for _row, raw in items:
            ev = decode_wire_event(raw)
            acc.types.append(ev.type)
            acc.khashes.append(key_hash(partition_key(ev.key, ev.source)))
            acc.events.append(msgspec.Raw(raw))
        acc.bodies = encode_entries(acc.types, acc.khashes, acc.events, now, group=group)
        first = router.commit_replayed(acc, group)
        ids = [row["id"] for row, _ in items]
        try:
            store.mark_replayed(ids)
        except sqlite3.OperationalError:
            # journaled already: the replay succeeded. Reporting "busy" made operators replay
            # twice (review #10); the writer thread marks them, waiting for the lock
            router.dlq_writer.submit(PendingDeadLetter({}, replayed=ids))
        replayed += [
            {"id": row["id"], "group": group, "event_id": row["event_id"], "seq": first + i}
            for i, (row, _) in enumerate(items)
        ]
    log.warning("dead_letters_replayed", count=len(replayed))
    return {"replayed": replayed, **page}


# -- reload ------------------------------------------------------------------------------
def reload(router: RouterSurface, validated: bytes = b"") -> dict:
    """Apply a new config: the one the launcher validated and hands over, or (a router
    run alone) the file re-read. Groups (added, removed, subscriptions), rate limits and
    the log level apply at once; a changed partition count refuses the whole reload;
    the rest needs a restart."""
    try:
        fresh = config_mod.from_bytes(validated) if validated else config_mod.load(router.config.source, router.env)
    except msgspec.MsgspecError as exc:
        log.error("reload_failed", error=str(exc))
        return {"error": f"unreadable config from the launcher: {exc}"}
    except ConfigError as exc:
        log.error("reload_failed", error=str(exc))
        return {"error": str(exc)}
    refusal = livegroups.refused(router.config.workers, fresh.workers)
    if refusal:
        log.error("reload_failed", error=refusal)
        return {"error": refusal}
    changed = config_mod.needs_restart(router.config, fresh)
    if fresh.log.level != router.config.log.level:
        logs.set_level(fresh.log.level)  # (launched: the launcher's level file says the same)
    groups = router.apply_live(fresh)
    log.info(
        "config_reloaded", rate_limits=router.intake.limiter.describe(), needs_restart=changed, **_nonempty(groups)
    )
    return {"rate_limits": router.intake.limiter.describe(), "needs_restart": changed, "groups": groups}


def _nonempty(d: dict) -> dict:
    return {k: v for k, v in d.items() if v}
