"""Worker groups added, removed or re-routed while the router runs (a reload).

A group added live starts where a group new at a router start would: `start: latest` at
the journal's end, `earliest` at its beginning. For `earliest` the journal is read once
for that group (its backlog, for lag, and its stream heads), as recovery does at start:
on a large journal that pauses the router loop for the read. A removed group is
dropped with its cursors (the cursor file is saved without it, as after a restart
without it): added again later, it starts by its `start` policy. Its dead letters stay
in the store. The launcher stops a removed group's members before; a member still
joined (`nexus worker` elsewhere) is told the group is unknown and stops.
"""

from __future__ import annotations

from typing import Protocol

import structlog

from nexus.config import WorkerGroupConfig
from nexus.protocol.events import DECODE_ERRORS
from nexus.protocol.partitions import partition_of
from nexus.protocol.wire import Error
from nexus.router.backlog import Backlog
from nexus.router.coordinator import Coordinator
from nexus.router.journal import Journal, entry_decoder
from nexus.router.routing import RouteTable, matches

log = structlog.get_logger("nexus.router")


class GroupParts(Protocol):
    """The router's parts a group lives in (nexus/router/server.py `Router`)."""

    routes: RouteTable
    journal: Journal
    coordinator: Coordinator
    backlog: Backlog
    heads: dict[str, list[int]]
    member_stats: dict[tuple[str, str], dict]

    def send_coord(self, identity: bytes, msg) -> None: ...


def refused(running: dict[str, WorkerGroupConfig], fresh: dict[str, WorkerGroupConfig]) -> str:
    """One line when a group's partition count changes (never live), else ""."""
    changed = [
        f"workers.{name}.partitions {spec.partitions} -> {fresh[name].partitions}"
        for name, spec in running.items()
        if name in fresh and fresh[name].partitions != spec.partitions
    ]
    return f"cannot change {', '.join(changed)} live; nothing was applied" if changed else ""


def apply(router: GroupParts, running: dict[str, WorkerGroupConfig], fresh: dict[str, WorkerGroupConfig]) -> dict:
    """Make the router's groups those of `fresh` (partition counts already checked)."""
    removed = [name for name in running if name not in fresh]
    added = [name for name in fresh if name not in running]
    rerouted = [name for name in fresh if name in running and fresh[name].subscribe != running[name].subscribe]
    for name in removed:
        for identity in router.coordinator.remove_group(name):
            router.send_coord(identity, Error(f"group {name!r} was removed by a reload", "unknown_group"))
        router.heads.pop(name, None)
        router.backlog.streams.pop(name, None)
        for key in [k for k in router.member_stats if k[0] == name]:
            del router.member_stats[key]
        log.info("group_removed", group=name)
    # the routes first: the scan of an `earliest` group below routes by them
    router.routes.replace({name: (spec.subscribe, spec.partitions) for name, spec in fresh.items()})
    for name in added:
        _add(router, name, fresh[name])
    for name in rerouted:
        log.info("group_rerouted", group=name, subscribe=fresh[name].subscribe)
    return {"added": added, "removed": removed, "rerouted": rerouted}


def _add(router: GroupParts, name: str, spec: WorkerGroupConfig) -> None:
    journal, partitions = router.journal, spec.partitions
    start = 0 if spec.start == "earliest" else journal.last_seq
    cursors = [start] * partitions
    # heads (each stream's last seq, the `prev` of its next delivery) are found by the
    # scan below; for `latest` every event is before the cursor, and a head of 0 (below
    # the member's watermark) makes no member fetch anything
    heads = [0] * partitions
    router.backlog.add_group(name, cursors)
    streams = router.backlog.streams[name]
    scanned = 0
    if spec.start == "earliest":
        for seq, body in journal.iter_all(start):
            try:
                entry = entry_decoder.decode(body)
            except DECODE_ERRORS:
                continue
            if (entry.group == name) if entry.group else matches(entry.type, spec.subscribe):
                p = partition_of(entry.khash, partitions)
                heads[p] = seq
                streams[p].add_one(seq)
                scanned += 1
    router.heads[name] = heads
    router.coordinator.add_group(name, partitions, cursors)
    log.info("group_added", group=name, partitions=partitions, start=spec.start, cursor=start, backlog=scanned)
