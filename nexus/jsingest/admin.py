"""Requests from the launcher, the CLI and the HTTP process (status, metrics, dead
letters, journal replay, tail reads, member exits, reload), answered from the cluster.

INTERFACE (fixed for the helpers building issue 16):
    admin = Admin(cfg, nc, js, names, intake_stats)   # intake_stats() -> dict of counters
    reply: Coord = await admin.answer(msg)             # Reply | Journaled | Error

The replies have the shapes of nexus/router/admin.py (the launcher's readiness and
autoscaler, `nexus status`, the HTTP port read them unchanged), plus an `engine` section.
Status is the launcher's probe (asked with a 0.1 s timeout while it starts), and a
status read of the cluster costs a request per partition: so it is kept fresh by a
refresher task while someone asks, and answered from the last one.

A member is live while its record's `beat` changes: by this process's own clock, a beat
unchanged for heartbeat_interval x heartbeat_misses is a dead member (its record stays
until its partitions are taken, but it counts as gone here, as the members count it).
"""

from __future__ import annotations

import asyncio
import os
import socket
import time
from collections.abc import Callable
from typing import Any

import msgspec
import structlog
from nats.aio.client import Client
from nats.js import JetStreamContext
from nats.js.errors import APIError, NotFoundError

from nexus import config as config_mod
from nexus.common import metricnames as mn
from nexus.common.metrics import empty_snapshot
from nexus.config import Config
from nexus.errors import ConfigError, describe_exit
from nexus.jetstream import names as hdr
from nexus.jetstream import ops
from nexus.jetstream.names import Names
from nexus.jetstream.records import MemberRecord
from nexus.protocol.events import decode_wire_event
from nexus.protocol.wire import (
    Coord,
    DlqRequest,
    Error,
    MemberExited,
    MetricsRequest,
    Read,
    ReloadRequest,
    ReplayRequest,
    Reply,
    StatusRequest,
)
from nexus.router import livegroups

log = structlog.get_logger("nexus.jsingest")

LIST_LIMIT = 1000  # rows `dlq list` returns (as the embedded engine)
REFRESH_EVERY = 0.5  # seconds between status refreshes while someone asks
ASKED_WITHIN = 10.0  # seconds: no status request for this long stops the refresher
STALE = 2.0  # seconds: a cached status older than this is read afresh before answering
CLUSTER_TIMEOUT = 3.0  # seconds one refresh of the cluster may take
LAG_TIMEOUT = 1.0  # seconds one partition's lag may take (then "unknown")


class Admin:
    def __init__(self, cfg: Config, nc: Client, js: JetStreamContext, names: Names, intake_stats: Callable[[], dict]):
        self.cfg, self.nc, self.js, self.names, self.intake_stats = cfg, nc, js, names, intake_stats
        self.started = time.time()
        self.host = socket.gethostname()
        self.beats: dict[str, tuple[int, float]] = {}  # member key -> (beat, monotonic time it changed)
        self.cached: dict[str, Any] | None = None
        self.cached_at = 0.0
        self.asked_at = 0.0
        self.refresher: asyncio.Task | None = None
        self.refreshing = asyncio.Lock()
        self.dlq_runs: dict[tuple, int] = {}  # a paged dead-letter replay -> the last id it covers

    async def answer(self, msg: Coord) -> Coord:
        try:
            if isinstance(msg, StatusRequest):
                return Reply(await self.status())
            if isinstance(msg, MetricsRequest):
                return Reply(await self.metrics())
            if isinstance(msg, Read):
                rc = self.cfg.router
                limit = max(0, min(msg.limit, rc.fetch_limit))
                return await ops.read_events(
                    self.nc, self.js, self.names, msg.after, limit, list(msg.types), msg.max_bytes or rc.fetch_bytes
                )
            if isinstance(msg, DlqRequest):
                return Reply(await self.dlq(msg))
            if isinstance(msg, ReplayRequest):
                return Reply(await self.replay(msg))
            if isinstance(msg, MemberExited):
                return Reply(await self.member_exited(msg))
            if isinstance(msg, ReloadRequest):
                return Reply(self.reload(msg.config))
        except ops.UNREACHABLE as exc:
            return Error(f"cluster not answering ({type(exc).__name__}); try again", "unavailable")
        except Exception as exc:  # a cluster refusal (no leader, no quorum): one line, the process goes on
            log.warning("admin_request_failed", request=type(msg).__name__, error=repr(exc))
            return Error(f"{type(msg).__name__}: {type(exc).__name__}: {exc}", "engine_error")
        return Error(f"{type(msg).__name__}: not an admin request", "bad_message")

    # -- status ---------------------------------------------------------------------------
    async def status(self) -> dict[str, Any]:
        self.asked_at = time.monotonic()
        if self.refresher is None or self.refresher.done():
            self.refresher = asyncio.create_task(self._refresh_while_asked())
        if self.cached is None or time.monotonic() - self.cached_at > STALE:
            await self.refresh(older_than=STALE)
        assert self.cached is not None
        return {**self.cached, "router": {**self.cached["router"], **self._ingest()}}

    async def _refresh_while_asked(self) -> None:
        while time.monotonic() - self.asked_at < ASKED_WITHIN:
            await asyncio.sleep(REFRESH_EVERY)
            try:
                await self.refresh()
            except Exception as exc:  # (refresh catches the cluster's own failures)
                log.warning("status_refresh_failed", error=repr(exc))

    async def refresh(self, older_than: float = 0.0) -> None:
        """Read the cluster into the cached status (one at a time; with `older_than`, not
        again when the one just waited for is younger than that)."""
        async with self.refreshing:
            if older_than and self.cached is not None and time.monotonic() - self.cached_at <= older_than:
                return
            try:
                status = await asyncio.wait_for(self._read_cluster(), CLUSTER_TIMEOUT)
            except (*ops.UNREACHABLE, NotFoundError) as exc:
                status = self._unreachable(exc)
            except Exception as exc:  # no leader, no quorum: status still answers, saying so
                status = self._unreachable(exc)
            self.cached, self.cached_at = status, time.monotonic()

    async def _read_cluster(self) -> dict[str, Any]:
        facts = await ops.stream_facts(self.js, self.names)
        entries, dead, rejected = await asyncio.gather(
            ops.kv_entries(self.js, self.names),
            ops.dead_letter_counts(self.js, self.names),
            self.js.stream_info(self.names.rejected_stream),
        )
        facts["rejected_kept"] = rejected.state.messages  # in {stream}_REJECTED, with their reasons
        groups = {}
        for name, spec in self.cfg.workers.items():
            groups[name] = await self._group(name, spec.partitions, entries, dead.get(name, 0))
        self._forget_gone(entries)
        return {"router": self._router_part(facts), "groups": groups, "engine": {**facts, "reachable": True}}

    async def _group(self, name: str, partitions: int, entries: dict, dead: int) -> dict[str, Any]:
        members = [m for m in ops.decode_members(entries, name) if self._live(name, m)]
        live = {m.member for m in members}
        owners = [ops.decode_owner(entries, name, p) for p in range(partitions)]
        start = ops.decode_group(entries, name)
        owned = [o.member if o is not None and o.member in live else None for o in owners]
        lags = await asyncio.gather(*(self._lag(name, p, partitions, owners[p], start) for p in range(partitions)))
        total: int | str = sum(x for x in lags if isinstance(x, int))
        if any(not isinstance(x, int) for x in lags):
            total = "unknown"
        return {
            "partitions": partitions,
            "members": [_member_row(m) for m in members],
            "unassigned": sum(1 for o in owned if o is None),
            "owners": owned,
            "lag": total,
            "partition_lag": list(lags),
            "cursor_min": start.start_seq - 1 if start is not None else 0,
            "dead_letters": dead,
        }

    async def _lag(self, group: str, p: int, partitions: int, owner, start) -> int | str:
        """One partition's lag; "unknown" while its consumer does not answer (its leader
        moving to another node): the rest of the status still does."""
        try:
            return await asyncio.wait_for(
                ops.partition_lag(self.js, self.names, group, p, partitions, owner, start), LAG_TIMEOUT
            )
        except (*ops.UNREACHABLE, APIError) as exc:
            log.debug("lag_unknown", group=group, partition=p, error=repr(exc))
            return "unknown"

    def _live(self, group: str, m: MemberRecord) -> bool:
        key = Names.member_key(group, m.member)
        now = time.monotonic()
        seen = self.beats.get(key)
        if seen is None or seen[0] != m.beat:
            self.beats[key] = (m.beat, now)
            return True
        rc = self.cfg.router
        return now - seen[1] <= float(rc.heartbeat_interval) * rc.heartbeat_misses

    def _forget_gone(self, entries: dict) -> None:
        for key in [k for k in self.beats if k not in entries]:
            del self.beats[key]

    def _router_part(self, facts: dict[str, Any]) -> dict[str, Any]:
        return {
            "pid": os.getpid(),
            "tail_subscribers": 0,
            "seq": facts["last_seq"],
            # the events stream in the journal's place (readers of `journal` keep working)
            "journal": {
                "dir": f"nats stream {self.names.stream}",
                "first_seq": facts["first_seq"],
                "last_seq": facts["last_seq"],
                "bytes": facts["bytes"],
                "segments": [],
                "fsync": f"replicas={facts['replicas_configured']}",
                "cursor_past_end": [],
            },
            "storage": {"state": "ok", "failing": {}},
            "recent_rejects": [],
        }

    def _unreachable(self, exc: BaseException) -> dict[str, Any]:
        why = f"{type(exc).__name__}: {exc}".rstrip(": ")
        part = self._router_part({"last_seq": 0, "first_seq": 0, "bytes": 0, "replicas_configured": 0})
        groups = {
            name: {
                "partitions": spec.partitions,
                "members": [],
                "unassigned": spec.partitions,
                "owners": [None] * spec.partitions,
                "lag": "unknown",
                "partition_lag": ["unknown"] * spec.partitions,
                "cursor_min": 0,
                "dead_letters": 0,
            }
            for name, spec in self.cfg.workers.items()
        }
        engine = {"stream": self.names.stream, "reachable": False, "error": why, "leader": None, "replicas": []}
        return {"router": part, "groups": groups, "engine": engine}

    def _ingest(self) -> dict[str, Any]:
        """The ingest's counters, in the router's status keys (and as they are, `ingest`)."""
        stats = dict(self.intake_stats())
        rejected = stats.get("rejected", {})
        by_reason = dict(rejected) if isinstance(rejected, dict) else {}
        return {
            "engine": "nats",
            "uptime": round(time.time() - self.started, 1),
            "accepted": int(stats.get("accepted", 0)),
            "rejected": sum(by_reason.values()) if by_reason else int(rejected or 0),
            "rejected_by_reason": by_reason,
            "duplicates": int(stats.get("duplicates", 0)),
            "rate_limits": stats.get("rate_limits", {}),
            "security": stats.get("security", {"curve": False}),
            "ingest": {k: v for k, v in stats.items() if k not in ("metrics", "security", "rate_limits")},
        }

    # -- metrics ----------------------------------------------------------------------------
    async def metrics(self) -> dict[str, Any]:
        status = await self.status()
        stats = self.intake_stats()
        own = stats.get("metrics")
        snap = own if isinstance(own, dict) and "gauges" in own else empty_snapshot()
        snap = {kind: dict(snap.get(kind, {})) for kind in ("counters", "gauges", "histograms")}
        gauges = snap["gauges"]
        engine = status.get("engine", {})
        gauges[mn.NATS_LEADER] = [[{}, 1 if engine.get("leader") else 0]]
        current = sum(1 for r in engine.get("replicas", []) if r.get("current")) + (1 if engine.get("leader") else 0)
        gauges[mn.NATS_REPLICAS_CURRENT] = [[{}, current]]
        group_lag, partition_lag, dead = [], [], []
        for name, g in status["groups"].items():
            if isinstance(g["lag"], int):
                group_lag.append([{"group": name}, g["lag"]])
            for p, lag in enumerate(g.get("partition_lag", [])):
                if isinstance(lag, int):
                    partition_lag.append([{"group": name, "partition": str(p)}, lag])
            dead.append([{"group": name}, g["dead_letters"]])
        gauges[mn.GROUP_LAG] = group_lag
        gauges[mn.NATS_CONSUMER_LAG] = partition_lag
        gauges[mn.DEAD_LETTERS] = dead
        members = {}
        entries = await ops.kv_entries(self.js, self.names, "m.>")
        for name in self.cfg.workers:
            for m in ops.decode_members(entries, name):
                if self._live(name, m) and m.metrics:
                    # a process name is unique on its host only: two hosts' get the member id
                    whose = f"{name}/{m.name}"
                    members[f"{name}/{m.member}" if whose in members else whose] = m.metrics
        return {"router": snap, "members": members}

    # -- dead letters -----------------------------------------------------------------------
    async def dlq(self, msg: DlqRequest) -> dict[str, Any]:
        if msg.group is not None and msg.group not in self.cfg.workers:
            return {"error": f"unknown group {msg.group!r}"}
        js, names = self.js, self.names
        if msg.action == "list":
            found = await ops.dead_letter_msgs(self.nc, js, names, msg.group)
            rows = [r for r in map(ops.dead_letter_row, found) if msg.type is None or r["type"] == msg.type]
            return {"dead_letters": rows[:LIST_LIMIT], "total": len(rows)}
        if msg.action == "show":
            dl = await ops.dead_letter_msg(js, names, msg.ids[0]) if msg.ids else None
            if dl is None:
                return {"error": f"no dead letter with id {msg.ids[0] if msg.ids else '?'}"}
            row = ops.dead_letter_row(dl)
            row["event"] = _event_fields(dl.data or b"")
            return {"dead_letter": row}
        if msg.action == "replay":
            return await self._replay_dead_letters(msg)
        if msg.action == "purge":
            return await self._purge(msg)
        return {"error": f"unknown dlq action {msg.action!r}"}

    async def _replay_dead_letters(self, msg: DlqRequest) -> dict[str, Any]:
        js, names = self.js, self.names
        page: dict[str, int] = {}
        if msg.ids:
            found = [(i, await ops.dead_letter_msg(js, names, i)) for i in msg.ids]
            missing = [str(i) for i, dl in found if dl is None]
            if missing:
                return {"error": f"no dead letter with id {', '.join(missing)}"}
            chosen = [dl for _, dl in found if dl is not None]
        elif msg.group or msg.all:
            # a run (the CLI's pages) covers the dead letters there when it began: one that
            # fails again is stored anew, past that end, and waits for the next run
            run = (msg.group, msg.type, msg.all)
            if not msg.after or run not in self.dlq_runs:
                self.dlq_runs[run] = (await js.stream_info(names.dlq_stream)).state.last_seq
            end = self.dlq_runs[run]
            listed = await ops.dead_letter_msgs(self.nc, js, names, msg.group, msg.after, msg.limit, upto=end)
            chosen = [dl for dl in listed if msg.type is None or ops.dead_letter_row(dl)["type"] == msg.type]
            if msg.limit:  # a page: where the next starts, and how many are left after it
                last = (listed[-1].seq or msg.after) if listed else end
                remaining = await ops.dead_letters_between(js, names, msg.group, last, end)
                page = {"next_after": last, "remaining": remaining}
        else:
            return {"error": "replay needs ids, --group G or --all"}
        replayed = []
        for dl in chosen:
            row = ops.dead_letter_row(dl)
            if row["group"] not in self.cfg.workers:
                continue  # a group removed since: kept for the operator
            seq = await ops.replay_dead_letter(js, names, dl)
            replayed.append({"id": row["id"], "group": row["group"], "event_id": row["event_id"], "seq": seq})
        log.warning("dead_letters_replayed", count=len(replayed))
        return {"replayed": replayed, **page}

    async def _purge(self, msg: DlqRequest) -> dict[str, Any]:
        js, names = self.js, self.names
        if msg.ids:
            purged = 0
            for i in msg.ids:
                try:
                    purged += bool(await js.delete_msg(names.dlq_stream, i))
                except NotFoundError:
                    pass
            return {"purged": purged}
        if not (msg.group or msg.all):
            return {"error": "purge needs ids, --group G or --all"}
        counts = await ops.dead_letter_counts(js, names)
        purged = counts.get(msg.group, 0) if msg.group else sum(counts.values())
        await js.purge_stream(names.dlq_stream, subject=names.dlq_subject(msg.group) if msg.group else None)
        return {"purged": purged}

    # -- journal replay ----------------------------------------------------------------------
    async def replay(self, msg: ReplayRequest) -> dict[str, Any]:
        spec = self.cfg.workers.get(msg.group)
        if spec is None:
            return {"error": f"unknown group {msg.group!r}"}
        state = (await self.js.stream_info(self.names.stream)).state
        if msg.from_time:
            from_seq = await ops.seq_at_time(self.js, self.names, msg.from_time)
        else:
            from_seq = max(msg.from_seq, state.first_seq)
        from_seq = min(max(from_seq, 1), state.last_seq + 1)
        for p in range(spec.partitions):
            await ops.reset_partition(self.js, self.names, msg.group, p, from_seq)
        self.cached_at = 0.0  # the next status reads the cluster afresh
        log.warning("journal_replay", group=msg.group, from_seq=from_seq, last_seq=state.last_seq)
        return {
            "group": msg.group,
            "from_seq": from_seq,
            "last_seq": state.last_seq,
            "events": max(0, state.last_seq - from_seq + 1),
        }

    # -- member exits ------------------------------------------------------------------------
    async def member_exited(self, msg: MemberExited) -> dict[str, Any]:
        """The launcher saw a local member die: its record goes now (the others take its
        partitions at once); the poison it names is stored as dead letters and marked in
        its partition's owner record for the owners to pass over (OwnerRecord.skip)."""
        if msg.group not in self.cfg.workers:
            return {"error": f"unknown group {msg.group!r}"}
        removed = await ops.delete_member(self.js, self.names, msg.group, msg.member, msg.pid, self.host)
        dead = []
        how = describe_exit(msg.exit_code)
        timeout = msg.reason == "handler_timeout"
        for p, seqs in msg.poison.items():
            stored = [seq for seq in seqs if await self._store_poison(msg, p, seq, how, timeout)]
            # stored or not in the stream at all: no owner may run it again
            await ops.add_skips(self.js, self.names, msg.group, p, list(seqs))
            dead += stored
        self.cached_at = 0.0  # the next status reads the cluster afresh
        log.info("member_exited", group=msg.group, member=msg.member, removed=removed, dead_lettered=dead)
        return {"ok": True, "removed": removed, "dead_lettered": dead}

    async def _store_poison(self, msg: MemberExited, p: int, seq: int, how: str, timeout: bool) -> bool:
        ev = await ops.event_at(self.js, self.names, seq)
        if ev is None:
            log.error("poison_not_in_stream", group=msg.group, seq=seq)
            return False
        error = (
            f"HandlerTimeout: member {msg.member} ran past handler_timeout on this event ({how}), "
            "the limit of timeouts was reached"
            if timeout
            else f"ProcessCrashed: member {msg.member} died on this event ({how}); it killed members max_crashes times"
        )
        headers = {
            hdr.MSG_ID: f"{msg.group}:{seq}",  # the member's own id for this dead letter: stored once
            hdr.H_GROUP: msg.group,
            hdr.H_PARTITION: str(p),
            hdr.H_SEQ: str(seq),
            hdr.H_ERROR: error,
            hdr.H_ATTEMPTS: "0",
        }
        await self.js.publish(self.names.dlq_subject(msg.group), ev.data or b"", headers=headers)
        return True

    # -- reload ------------------------------------------------------------------------------
    def reload(self, validated: bytes) -> dict[str, Any]:
        """Groups added and removed apply at once (members run them; status follows the
        new config); a changed partition count is refused; what the ingest process holds
        (endpoints, contracts, rate limits) and the `nats` section need a restart."""
        try:
            fresh = config_mod.from_bytes(validated) if validated else config_mod.load(self.cfg.source)
        except (msgspec.MsgspecError, ConfigError) as exc:
            return {"error": f"unreadable config: {exc}"}
        refusal = livegroups.refused(self.cfg.workers, fresh.workers)
        if refusal:
            return {"error": refusal}
        changed = config_mod.needs_restart(self.cfg, fresh)
        if fresh.router.rate_limits != self.cfg.router.rate_limits:
            changed.append("router.rate_limits (engine nats: the ingest reads them at its start)")
        groups = {
            "added": [g for g in fresh.workers if g not in self.cfg.workers],
            "removed": [g for g in self.cfg.workers if g not in fresh.workers],
            "rerouted": [
                g
                for g in fresh.workers
                if g in self.cfg.workers and fresh.workers[g].subscribe != self.cfg.workers[g].subscribe
            ],
        }
        self.cfg = config_mod.adopt_live(self.cfg, fresh)
        self.cached_at = 0.0  # the next status reads the cluster afresh
        log.info("config_reloaded", needs_restart=changed, **{k: v for k, v in groups.items() if v})
        return {"rate_limits": {}, "needs_restart": changed, "groups": groups}


def _member_row(m: MemberRecord) -> dict[str, Any]:
    return {
        "name": m.name,
        "host": m.host,
        "pid": m.pid,
        "partitions": list(m.partitions),
        "member": m.member,
        **m.stats,
    }


def _event_fields(raw: bytes) -> dict[str, Any]:
    try:
        ev = decode_wire_event(raw)
        payload = msgspec.msgpack.decode(ev.payload)
    except (msgspec.MsgspecError, UnicodeDecodeError, RecursionError):
        return {"payload": None, "unreadable": True}
    return {
        "id": ev.id,
        "type": ev.type,
        "source": ev.source,
        "key": ev.key,
        "time": ev.time,
        "priority": ev.priority,
        "correlation_id": ev.correlation_id,
        "v": ev.v,
        "payload": payload,
    }
