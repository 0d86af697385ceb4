"""The router process: ingest -> validate -> limit -> journal -> publish; coord.

One thread, one poll loop. Every accepted batch is written to the journal with one
write() before it is published or ACKed; the journal is the truth and PUB/SUB only
the fast path, so members repair gaps by fetching from it over `coord`.
"""

from __future__ import annotations

import contextlib
import errno
import gc
import os
import threading
import time
from itertools import chain

import msgspec
import structlog
import zmq

from nexus import config as config_mod
from nexus.common import blackbox
from nexus.common.datalock import ROUTER_LOCK, DataDirLock
from nexus.config import Config
from nexus.errors import ConfigError
from nexus.protocol import curve, transport
from nexus.protocol.events import DECODE_ERRORS, Contracts
from nexus.protocol.gatekeeper import Gatekeeper, Grant, KeyRing
from nexus.protocol.partitions import partition_of
from nexus.protocol.wire import (
    TAIL_TOPIC,
    Ack,
    Coord,
    DeadLetter,
    Delivery,
    DlqRequest,
    Error,
    Fetch,
    Heartbeat,
    Join,
    Leave,
    MemberExited,
    MetricsRequest,
    ProducerReply,
    Pulse,
    Read,
    Records,
    Released,
    ReloadRequest,
    ReplayRequest,
    Reply,
    StatusRequest,
    coord_decoder,
    encoder,
    topic,
)
from nexus.router import admin, journalread, livegroups
from nexus.router.backlog import Backlog
from nexus.router.connections import Connections
from nexus.router.coordinator import Coordinator, Group
from nexus.router.cursors import CursorStore
from nexus.router.deadletters import DeadLetterStore, DeadLetterWriter
from nexus.router.flusher import Flusher
from nexus.router.intake import Accepted, Intake, Outcome
from nexus.router.journal import Journal, StorageError, entry_decoder
from nexus.router.ratelimit import RateLimiter
from nexus.router.routing import RouteTable
from nexus.router.storage import REASON as STORAGE_REASON
from nexus.router.storage import RETRY_AFTER as STORAGE_RETRY_AFTER
from nexus.router.storage import StorageState
from nexus.router.telemetry import RouterTelemetry

Stream = tuple[int, list[int], list[msgspec.Raw]]  # one partition's events of a commit: prev, seqs, events
ADMIN_REQUESTS = (StatusRequest, ReplayRequest, DlqRequest, ReloadRequest, MetricsRequest)
MEMBER_MESSAGES = (Heartbeat, Ack, Released, Leave)  # from a joined member (Join, Fetch: any)

log = structlog.get_logger("nexus.router")

MAINTENANCE_EVERY = 0.1
INGEST_HWM = 100  # fire-mode batches (up to 1,000 events each) queued per producer
# in the router; beyond it PUSH blocks the producer
PROBE_EVERY = 1.0  # while storage is unavailable: try a write this often
REBIND_WITHIN = 2.0  # seconds to get a CURVE socket's port back after closing it (revocation)
FETCH_SCAN_BYTES = 64 * 2**20  # journal bytes one fetch examines at most (then the member asks again)


def _open_stream(slots: list[Stream | None], p: int, group_heads: list[int]) -> Stream:
    """Partition p's stream of a commit, started (after the partition's head) by the first
    event routed to it; later ones find it in `slots` without a call."""
    stream = slots[p] = (group_heads[p], [], [])
    return stream


@contextlib.contextmanager
def _beating(box, every: float = 0.2):
    """Beat the black box from a thread while the block runs (journal recovery)."""
    if box is None:
        yield
        return
    done = threading.Event()

    def beat() -> None:
        while not done.wait(every):
            box.beat()

    thread = threading.Thread(target=beat, name="nexus-recovery-beat", daemon=True)
    thread.start()
    try:
        yield
    finally:
        done.set()
        thread.join()


class Router:
    def __init__(self, config: Config, env: str | None = None):
        self.config = config
        self.env = env
        rc = config.router
        self.contracts = Contracts.from_modules(config.contracts, config.contracts_untyped)
        self.routes = RouteTable({name: (g.subscribe, g.partitions) for name, g in config.workers.items()})
        self.intake = Intake(self.contracts, RateLimiter(rc.rate_limits), rc.max_event_bytes, rc.max_batch)
        self.journal = Journal(
            os.path.join(config.data_dir, "journal"),
            fsync=rc.journal.fsync,
            fsync_interval=rc.journal.fsync_interval_ms / 1000.0,
            segment_bytes=rc.journal.segment_bytes,
            retain=rc.journal.retain,
        )
        self.cursors = CursorStore(os.path.join(config.data_dir, "cursors.msgpack"))
        self.storage = StorageState()
        self.flusher = Flusher(self.journal, self.cursors, self.journal.fsync_interval, storage=self.storage)
        self.backlog = Backlog()  # lag per group, kept as events are journaled
        self.cursor_past_end: list[dict] = []  # groups whose cursor stood past the journal's end
        self._next_probe = 0.0
        self.heads: dict[str, list[int]] = {}  # group -> last seq per partition stream
        self.coordinator = Coordinator(
            rc.heartbeat_interval * rc.heartbeat_misses,
            release_timeout=config.shutdown_timeout,
            heads=self.heads,
            end=lambda: self.journal.last_seq,
        )
        self.tail_subscribers = 0
        self.member_stats: dict[tuple[str, str], dict] = {}
        self.member_metrics: dict[tuple[str, str], dict] = {}  # each member's last snapshot
        self.connections = Connections()  # producers connected (ingest, confirm)
        self.telemetry = RouterTelemetry(
            self.intake,
            self.journal,
            self.backlog,
            self.coordinator,
            self.storage,
            dead_letters=lambda: self.dlq.counts(),
            producers=self._producers_connected,
        )
        self.reload_requested = False
        # started by a launcher (its pid): the launcher owns reloads, SIGHUP here is ignored
        self.launcher_pid = 0
        self.started = time.time()
        self.stop_event = threading.Event()
        self._pending_replies: list[tuple[bytes, bytes | Outcome | ProducerReply]] = []
        self._posted_cursors: dict[str, list[int]] | None = None
        self._retention_checked: dict[str, list[int]] | None = None
        self._staged: list[Accepted] = []  # accepted in this loop turn, not yet journaled
        self.expect_rejoin = False  # restarted while members live: they rejoin (see Coordinator.expect_rejoin)
        # CURVE (security.curve): tcp:// sockets are CURVE servers, and every message on
        # them is checked against its key's grant (the `keyed` sockets)
        curve.check_binds(config, {k: v for k, v in curve.server_endpoints(config).items() if k != "control"})
        self.curve = curve.server_keys(config)
        self.gatekeeper: Gatekeeper | None = None
        self._keyed: set[zmq.Socket] = set()
        self._poller = zmq.Poller()

    # -- start ---------------------------------------------------------------------
    def recover(self) -> None:
        saved = self.cursors.load()
        cursors_by_group = self._start_cursors(saved)  # None: a new `latest` group, set below
        never = 1 << 63
        for name, group in self.config.workers.items():
            self.heads[name] = [0] * group.partitions
        routes, heads, intake, streams = self._routes_for, self.heads, self.intake, self.backlog.streams
        tracked = {name: c or [never] * len(heads[name]) for name, c in cursors_by_group.items()}
        for name, cursors in tracked.items():
            self.backlog.add_group(name, cursors)

        answer_every = [0]

        def on_record(seq: int, body: memoryview) -> None:
            answer_every[0] += 1 + (len(body) >> 15)  # every 512 records or ~16 MiB
            if answer_every[0] >= 512:
                answer_every[0] = 0
                self._answer_while_recovering()
            try:
                entry = entry_decoder.decode(body)
            except DECODE_ERRORS:  # CRC-valid but unreadable: never from us
                log.error("journal_entry_unreadable", seq=seq)
                return
            for route in routes(entry.type, entry.group):
                p = partition_of(entry.khash, route.partitions)
                heads[route.group][p] = seq
                if seq > tracked[route.group][p]:
                    streams[route.group][p].add_one(seq)
            if entry.producer:
                intake.recovered(entry.producer, entry.pseq)

        recovery = self.journal.open(on_record)  # one pass over the journal
        start: dict[str, list[int]] = {}
        for name, group in self.config.workers.items():
            found = cursors_by_group[name]
            if found is None:  # a new `latest` group: it starts at the journal's end
                found = [self.journal.last_seq] * group.partitions
                self.backlog.add_group(name, found)
            start[name] = found
        self._check_cursors_past_end(start)
        for name, group in self.config.workers.items():
            self.coordinator.add_group(name, group.partitions, start[name])
        self._save_cursors()
        log.info(
            "router_recovered",
            records=recovery.records,
            last_seq=self.journal.last_seq,
            truncated_bytes=recovery.truncated_bytes,
            damaged_ranges=len(recovery.damaged),
            groups=list(self.config.workers),
        )

    def _answer_while_recovering(self) -> None:
        """Recovery reads the whole journal: meanwhile answer status (marked recovering)
        and tell admin requests to come back; members' joins are dropped (they join
        again every second)."""
        coord = getattr(self, "coord", None)
        if coord is None:
            return
        for _ in range(100):
            try:
                frames = coord.recv_multipart(zmq.NOBLOCK)
            except zmq.Again:
                return
            if len(frames) != 2:
                continue
            try:
                msg = coord_decoder.decode(frames[1])
            except DECODE_ERRORS:
                continue
            if isinstance(msg, StatusRequest):
                self.send_coord(frames[0], Reply(admin.recovering_status(self)))
            elif isinstance(msg, (*ADMIN_REQUESTS, Read)):
                self.send_coord(frames[0], Error("the router is still reading its journal; try again", "recovering"))

    def _start_cursors(self, saved: dict[str, list[int]]) -> dict[str, list[int] | None]:
        out: dict[str, list[int] | None] = {}
        for name, group in self.config.workers.items():
            cursors = saved.get(name)
            if cursors is not None and len(cursors) != group.partitions:
                # partition count changed: restart every partition from the oldest cursor
                log.warning("partitions_changed", group=name, old=len(cursors), new=group.partitions)
                cursors = [min(cursors)] * group.partitions
            if cursors is None and (group.start == "earliest" or self.cursors.lost):
                # a damaged cursor file: groups it lost resume at the journal start, never `latest`
                cursors = [0] * group.partitions
            out[name] = list(cursors) if cursors is not None else None
        return out

    def _check_cursors_past_end(self, cursors_by_group: dict[str, list[int]]) -> None:
        """A cursor past the journal's last seq (the journal lost its tail): report it,
        and start the next seq after the highest cursor. Otherwise events accepted from
        now on would get seqs at or below that cursor, count as handled, and never be
        delivered while lag shows 0 (a silent stall)."""
        last = self.journal.last_seq
        for name, cursors in cursors_by_group.items():
            if cursors and max(cursors) > last:
                found = {"group": name, "cursor": max(cursors), "last_seq": last}
                self.cursor_past_end.append(found)
                log.error("cursor_past_end", **found)
        if self.cursor_past_end:
            self.journal.skip_to(max(c["cursor"] for c in self.cursor_past_end))

    def _save_cursors(self) -> None:
        try:
            self.cursors.save(self.coordinator.cursor_snapshot())
            self.storage.succeeded("cursors")
        except OSError as exc:
            self.storage.failed("cursors", exc)  # the flusher tries again

    # -- main loop -----------------------------------------------------------------
    def run(self) -> None:
        # One router per data dir, before the journal is even opened: a second one
        # (a standalone router beside a launched pipeline) refuses, touching nothing.
        lock = DataDirLock(self.config.data_dir, ROUTER_LOCK, "router").acquire()
        try:
            self._run()
        finally:
            lock.release()

    def _run(self) -> None:
        # dead letters are written by one thread (never stalls the loop); the loop's own
        # connection reads (status, dlq list) and runs operator purges with a short busy wait
        path = os.path.join(self.config.data_dir, "dlq.sqlite3")
        self.dlq = DeadLetterStore(path)
        ctx = self.ctx = zmq.Context()
        flusher_started = False
        try:
            if self.curve is not None:  # the ZAP handler before the first CURVE bind
                keys = KeyRing(curve.authorized_keys_dir(self.config), self.curve.pair)
                self.gatekeeper = Gatekeeper(ctx, keys).start()
            # coord first: status (the launcher's readiness probe) is answered while
            # recovery reads the journal, however large it is
            self.coord = self._open("coord")
            with _beating(blackbox.current()):  # a long recovery is not a hang
                self.recover()
            admin.restore_skips(self)
        except BaseException:
            self._stop_gatekeeper()
            ctx.destroy(linger=0)
            self.dlq.close()  # a failed start (bind, recovery) leaks no connection or fd
            self.journal.close()
            raise
        self.dlq_writer = DeadLetterWriter(path).start()
        try:
            self.ingest = self._open("ingest")
            self.confirm = self._open("confirm")
            self.publish = self._open("publish")
            log.info(
                "router_ready",
                ingest=self.config.ingest,
                confirm=self.config.confirm,
                publish=self.config.publish,
                coord=self.config.coord,
                curve=self.curve is not None,
            )
            self.flusher.start()
            flusher_started = True
            if self.expect_rejoin:
                self.coordinator.expect_rejoin(time.monotonic())
            # what starting made (imports, config, recovery's index) lives as long as the
            # router: out of the collector's reach, so a full collection during the run
            # scans only what the run made instead of stalling the loop for all of it
            gc.freeze()
            self._loop()
        finally:
            if flusher_started:  # a bind error must not be hidden by stopping a thread never started
                self.flusher.stop()
            self.dlq_writer.stop()
            self._stop_gatekeeper()
            self.connections.stop()
            ctx.destroy(linger=0)
            self.journal.close()
            self._save_cursors()
            self.dlq.close()
            log.info("router_stopped", last_seq=self.journal.last_seq, accepted=self.intake.accepted_total)

    def _open(self, name: str, retry_for: float = 0.0) -> zmq.Socket:
        """Bind one of the router's sockets (ingest, confirm, publish, coord); a tcp:// one
        is a CURVE server when keys are configured, its messages checked by key.
        `retry_for`: seconds to retry a taken address (a socket just closed releases its
        port from libzmq's I/O thread, a moment later)."""
        endpoint = getattr(self.config, name)
        keys = self.curve
        keyed = keys is not None and endpoint.startswith("tcp://")
        deadline = time.monotonic() + retry_for
        while True:
            try:
                if name == "publish":
                    sock = transport.publisher(self.ctx, endpoint, curve=keys)
                    if keyed:  # subscriptions are checked (_on_subscription_keyed) before they apply
                        sock.setsockopt(zmq.XPUB_MANUAL, 1)
                elif name == "ingest":
                    sock = transport.bind(self.ctx, zmq.PULL, endpoint, hwm=INGEST_HWM, curve=keys)
                else:
                    sock = transport.bind(self.ctx, zmq.ROUTER, endpoint, curve=keys)
                break
            except zmq.ZMQError as exc:
                # a port just released, or a moment without file descriptors: retried
                if exc.errno not in (errno.EADDRINUSE, errno.EMFILE, errno.ENFILE) or time.monotonic() >= deadline:
                    raise ConfigError(f"router cannot bind {endpoint}: {exc}") from None
                time.sleep(0.01)
        if keyed and self.gatekeeper is not None:
            self._keyed.add(sock)
            self.gatekeeper.watch(sock)  # (it counts the connections of CURVE sockets)
        elif name in ("ingest", "confirm"):
            self.connections.watch(sock)
        self._poller.register(sock, zmq.POLLIN)
        return sock

    def _reopen_keyed(self, revoked: set[str]) -> None:
        """Keys were revoked or changed: close every CURVE socket and bind it again, which
        ends every connection (libzmq has no per-peer disconnect, and an unbind leaves the
        accepted connections open). Authorized peers reconnect and authenticate again
        within RECONNECT_IVL; what was in flight comes back the usual way (producers
        resend unacked batches, members fetch gaps)."""
        assert self.gatekeeper is not None
        for name in ("coord", "ingest", "confirm", "publish"):
            old = getattr(self, name)
            if old not in self._keyed:
                continue
            self._poller.unregister(old)
            self._keyed.discard(old)
            self.gatekeeper.forget(old)
            old.close(0)
            setattr(self, name, self._open(name, retry_for=REBIND_WITHIN))
        self.tail_subscribers = 0  # (subscriptions come again with the reconnects)
        log.warning("connections_closed", keys=sorted(revoked), reason="keys revoked or changed")

    def _stop_gatekeeper(self) -> None:
        if self.gatekeeper is not None:
            for sock in list(self._keyed):
                self.gatekeeper.forget(sock)
            self.gatekeeper.stop()

    def _loop(self) -> None:
        poller = self._poller
        next_maintenance = time.monotonic()
        while not self.stop_event.is_set():
            ready = dict(poller.poll(50))
            now = time.monotonic()
            if self.coord in ready:
                self._drain(self.coord, self._on_coord, 200)
            if self.ingest in ready:
                self._drain(self.ingest, self._on_ingest, 50)
            if self.confirm in ready:
                self._drain(self.confirm, self._on_confirm, 50)
            if self.publish in ready:
                self._drain(self.publish, self._on_subscription, 1000)
            self._send_replies()
            if self.dlq_writer.done:
                admin.dead_letters_written(self)
            if self.reload_requested:
                self.reload_requested = False
                self._on_sighup()
            if now >= next_maintenance:
                self.telemetry.loop_lag.observe(now - next_maintenance)  # how late the tick runs
                self._maintenance(now)
                next_maintenance = now + MAINTENANCE_EVERY
        self._send_replies()
        try:
            self.journal.sync()
        except OSError as exc:
            self.storage.failed("fsync", exc)
        self._wait_for_members()

    def _wait_for_members(self) -> None:
        """Stopping: keep serving coord a little while members still leave, so their
        final acks land even when every process got the signal at once."""
        deadline = time.monotonic() + min(5.0, self.config.shutdown_timeout)
        while time.monotonic() < deadline and any(g.members for g in self.coordinator.groups.values()):
            if self.coord.poll(50):
                self._drain(self.coord, self._on_coord, 200)
            if self.dlq_writer.done:
                admin.dead_letters_written(self)
            if self.confirm.poll(0):
                self._drain(self.confirm, self._on_confirm, 50)
                self._send_replies()

    def _drain(self, sock: zmq.Socket, handler, limit: int) -> None:
        if sock in self._keyed:  # CURVE: frames with their key (User-Id), to other handlers
            return self._drain_keyed(sock, limit)
        for _ in range(limit):
            try:
                frames = sock.recv_multipart(zmq.NOBLOCK, copy=True)
            except zmq.Again:
                return
            try:
                handler(frames)
            except Exception:  # the router never dies of one message
                log.exception("message_failed")
                self.intake.count_rejected("internal")

    def _drain_keyed(self, sock: zmq.Socket, limit: int) -> None:
        handler = {
            self.coord: self._on_coord_keyed,
            self.ingest: self._on_ingest_keyed,
            self.confirm: self._on_confirm_keyed,
            self.publish: self._on_subscription_keyed,
        }[sock]
        gatekeeper = self.gatekeeper
        assert gatekeeper is not None
        for _ in range(limit):
            try:
                frames = sock.recv_multipart(zmq.NOBLOCK, copy=False)
            except zmq.Again:
                return
            try:
                handler([f.bytes for f in frames], gatekeeper.grant(frames[-1]))
            except Exception:  # the router never dies of one message
                log.exception("message_failed")
                self.intake.count_rejected("internal")

    def _maintenance(self, now: float) -> None:
        if self.gatekeeper is not None:
            revoked = self.gatekeeper.tick(now)
            if revoked:
                self._reopen_keyed(revoked)
        self.connections.tick()
        box = blackbox.current()
        if box is not None:
            box.beat(now)  # the launcher's hang detection reads it
        if self.flusher.error is not None:
            raise self.flusher.error
        if not self.dlq_writer.alive():
            # (it catches every error: this is a bug) members would wait for DeadLetterStored forever
            raise RuntimeError("dead-letter writer thread died")
        for identity, msg in self.coordinator.expire(now):
            self.send_coord(identity, msg)
        if "journal" in self.storage.failing and now >= self._next_probe:
            # storage unavailable and maybe no batch to try it: a timer retry
            self._next_probe = now + PROBE_EVERY
            try:
                self.journal.probe()
                self.storage.succeeded("journal")
            except OSError:
                pass
        snapshot = self.coordinator.cursor_snapshot()
        if snapshot != self._posted_cursors:
            self._posted_cursors = snapshot
            self.flusher.post(snapshot)
        saved = self.flusher.saved
        if saved is not None and saved is not self._retention_checked:
            # only cursors already on disk may let segments go
            self._retention_checked = saved
            floor = min((min(c) for c in saved.values() if c), default=self.journal.last_seq)
            self.journal.enforce_retention(floor)

    def _send_replies(self) -> None:
        self._commit_staged()  # a reply never goes out before its events are written
        if not self._pending_replies:
            return
        if self.journal.fsync_policy == "always":
            self.journal.sync()
        for identity, payload in self._pending_replies:
            if isinstance(payload, Outcome):
                payload = encoder.encode(ProducerReply(ack=payload.ack, nacks=payload.nacks, error=payload.error))
            elif isinstance(payload, ProducerReply):
                payload = encoder.encode(payload)
            try:
                self.confirm.send_multipart((identity, payload), zmq.NOBLOCK)
            except zmq.ZMQError:
                pass  # producer gone or its queue full: it resends on timeout
        self._pending_replies.clear()

    # -- producers -------------------------------------------------------------------
    def _on_ingest(self, frames: list[bytes]) -> None:
        if len(frames) != 1:
            self.intake.count_rejected("bad_batch")
            return
        self._stage(self.intake.take(frames[0], False, time.monotonic()))

    def _on_confirm(self, frames: list[bytes], grant: Grant | None = None) -> None:
        identity = frames[0]
        if len(frames) != 2:
            self.intake.count_rejected("bad_batch")
            self._pending_replies.append(
                (identity, encoder.encode(ProducerReply(error="expected exactly one frame per message")))
            )
            return
        outcome = self._stage(self.intake.take(frames[1], True, time.monotonic(), grant))
        self._pending_replies.append((identity, outcome))  # encoded when sent: see _refuse

    # CURVE: `grant` is the sender's key, None when it was revoked since it connected
    def _on_ingest_keyed(self, frames: list[bytes], grant: Grant | None) -> None:
        if grant is None:
            self._revoked("ingest")
        elif len(frames) != 1:
            self.intake.count_rejected("bad_batch")
        else:
            self._stage(self.intake.take(frames[0], False, time.monotonic(), grant))

    def _on_confirm_keyed(self, frames: list[bytes], grant: Grant | None) -> None:
        if grant is None:
            self._revoked("confirm")
            reply = ProducerReply(error=f"forbidden: {REVOKED}")
            self._pending_replies.append((frames[0], encoder.encode(reply)))
        else:
            self._on_confirm(frames, grant)

    def _revoked(self, what: str) -> None:
        assert self.gatekeeper is not None
        self.gatekeeper.forbidden[f"revoked_{what}"] += 1

    def _stage(self, outcome: Outcome) -> Outcome:
        """Hold accepted events for the commit at the end of this loop turn."""
        if outcome.accepted.bodies:
            self._staged.append(outcome.accepted)
        return outcome

    def _commit_staged(self) -> None:
        if self._staged:
            staged, self._staged = self._staged, []
            try:
                self._commit(staged)
            except StorageError as exc:
                self._refuse(staged, exc)

    def _refuse(self, staged: list[Accepted], exc: StorageError) -> None:
        """The journal write failed (nothing of it stayed): NACK the confirmed events
        with a retryable reason instead of the ACK, count the fire-mode ones as refused.
        The producer resends them as new sequences after retry_after."""
        failed = {id(acc) for acc in staged}
        reason = f"{STORAGE_REASON}: {exc.strerror or exc}"
        for i, (identity, reply) in enumerate(self._pending_replies):
            if isinstance(reply, Outcome) and id(reply.accepted) in failed:
                nacks = list(reply.nacks) + self.intake.refuse(reply.accepted, reason, STORAGE_RETRY_AFTER)
                self._pending_replies[i] = (identity, ProducerReply(ack=reply.ack, nacks=nacks, error=reply.error))
        self.intake.storage_refused(staged, STORAGE_REASON, reason)

    def _commit(self, accepted: list[Accepted], only_group: str = "") -> int:
        """Journal accepted events with one write, then publish them to the matching
        group streams: one Delivery per stream for everything taken in this loop turn
        (fewer, larger messages: ZeroMQ's cost is per message)."""
        if only_group:
            self._commit_staged()  # keep journal order: staged events were accepted first
        bodies = list(chain.from_iterable(acc.bodies for acc in accepted))
        if not bodies:
            return self.journal.last_seq + 1
        try:
            if "fsync" in self.storage.failing:
                # writes may land in the page cache, but they are not durable: refuse
                # until the flusher's fsync succeeds again
                raise StorageError(errno.EIO, f"journal fsync failing ({self.storage.failing['fsync']})")
            first = self.journal.append(bodies)
        except StorageError as exc:
            self.storage.failed("journal", exc)
            raise
        self.storage.succeeded("journal")
        self.intake.journaled(accepted)
        # group -> per partition, the stream of this commit: (prev, seqs, events) or None
        streams: dict[str, list[Stream | None]] = {}
        heads = self.heads
        # the common case (every matching group) calls the cached table directly
        routes = self.routes.routes if not only_group else lambda t: self._routes_for(t, only_group)
        seq = first
        last_type: str | None = None
        targets: list[tuple[str, int, list[Stream | None]]] = []  # per route of the type

        def targets_of(type_: str) -> list[tuple[str, int, list[Stream | None]]]:
            found = []
            for route in routes(type_):
                slots = streams.get(route.group)
                if slots is None:
                    slots = streams[route.group] = [None] * route.partitions
                found.append((route.group, route.partitions, slots))
            return found

        for acc in accepted:
            types, khashes = acc.types, acc.khashes
            n = len(types)
            if n > 1 and types.count(types[0]) == n and khashes.count(khashes[0]) == n:
                # one type and one partition key (a producer's usual batch): one slice
                # per target stream instead of a step per event
                type_, khash = types[0], khashes[0]
                if type_ != last_type:
                    last_type, targets = type_, targets_of(type_)
                for group, partitions, slots in targets:
                    p = partition_of(khash, partitions)
                    stream = slots[p] or _open_stream(slots, p, heads[group])
                    stream[1].extend(range(seq, seq + n))
                    stream[2].extend(acc.events)
                seq += n
                continue
            for type_, khash, raw in zip(types, khashes, acc.events, strict=False):
                if type_ != last_type:
                    last_type, targets = type_, targets_of(type_)
                for group, partitions, slots in targets:
                    p = partition_of(khash, partitions)
                    stream = slots[p] or _open_stream(slots, p, heads[group])
                    stream[1].append(seq)
                    stream[2].append(raw)
                seq += 1
        send = self.publish.send_multipart
        backlog = self.backlog.streams
        groups = self.coordinator.groups
        for group, slots in streams.items():
            owner, group_heads, group_backlog = groups[group].owner, heads[group], backlog[group]
            for p, part in enumerate(slots):
                if part is None:
                    continue
                prev, seqs, events = part
                group_heads[p] = seqs[-1]
                group_backlog[p].add(seqs)
                # no live copy for a partition nobody owns yet (after a router restart a member
                # that has not rejoined may still be subscribed): its owner will fetch it
                if owner[p] is not None:
                    send((topic(group, p), encoder.encode(Delivery(prev, seqs, events))), zmq.NOBLOCK)
        if self.tail_subscribers:
            seqs = list(range(first, seq))
            events = list(chain.from_iterable(acc.events for acc in accepted))
            send((TAIL_TOPIC, encoder.encode(Delivery(0, seqs, events))), zmq.NOBLOCK)
        return first

    def _on_subscription(self, frames: list[bytes]) -> None:
        msg = frames[0]
        if msg[1:] == TAIL_TOPIC:
            self.tail_subscribers += 1 if msg[:1] == b"\x01" else -1
            self.tail_subscribers = max(self.tail_subscribers, 0)

    def _on_subscription_keyed(self, frames: list[bytes], grant: Grant | None) -> None:
        """XPUB_MANUAL: a subscription applies only when its key may read the topic: a
        group's `group/partition` topics for its members, the tail for admin keys."""
        msg = frames[0]
        if len(frames) != 1 or msg[:1] not in (b"\x00", b"\x01"):
            return
        subscribe, name = msg[:1] == b"\x01", msg[1:]
        group, slash, _ = name.partition(b"/")
        if not subscribe and grant is None:  # libzmq's own, for a subscriber that went away
            allowed = True
        elif grant is None:
            allowed = False
        elif name == TAIL_TOPIC:
            allowed = grant.admin
        else:  # a whole group/ prefix: a shorter one would match other groups' topics
            allowed = bool(slash) and grant.may_join(group.decode("utf-8", "replace"))
        if not allowed:
            if subscribe:
                assert self.gatekeeper is not None
                self.gatekeeper.forbidden["subscribe"] += 1
            return
        self.publish.setsockopt(zmq.SUBSCRIBE if subscribe else zmq.UNSUBSCRIBE, name)
        self._on_subscription(frames)

    # -- what admin uses (nexus/router/admin.py types it as RouterSurface) ---------------
    def commit_replayed(self, accepted: Accepted, group: str) -> int:
        """Journal events again for `group` alone (a dead-letter replay) and publish them
        to its streams, after anything staged; the first seq. Raises StorageError."""
        return self._commit([accepted], only_group=group)

    def _on_sighup(self) -> None:
        """SIGHUP: a router run alone re-reads its config file. Under a launcher it is
        ignored: a reload there stages groups across every process (members first, the
        router's routing last); this router re-reading the file alone would add and drop
        groups behind the launcher's back (`pkill -HUP -f nexus` reaches every process)."""
        if self.launcher_pid:
            log.warning(
                "sighup_ignored",
                launcher_pid=self.launcher_pid,
                reason=f"this router is run by the launcher (pid {self.launcher_pid}); "
                "use `nexus reload` (or SIGHUP the launcher) to reload the config",
            )
            return
        admin.reload(self)

    def apply_live(self, fresh: Config) -> dict:
        """A reload (partition counts checked): what applies live of `fresh` becomes the
        router's config (groups, routing, rate limits, log level); the rest waits for a
        restart. Returns the groups added, removed and re-routed."""
        groups = livegroups.apply(self, self.config.workers, fresh.workers)
        if fresh.router.rate_limits != self.config.router.rate_limits:
            self.intake.limiter = RateLimiter(fresh.router.rate_limits)
        self.config = config_mod.adopt_live(self.config, fresh)
        return groups

    # -- coord ---------------------------------------------------------------------
    def send_coord(self, identity: bytes, msg: Coord) -> None:
        """Send to a coord peer; never blocks (a gone or backed-up peer asks again)."""
        try:
            self.coord.send_multipart((identity, encoder.encode(msg)), zmq.NOBLOCK)
        except zmq.ZMQError:
            pass

    def _on_coord_keyed(self, frames: list[bytes], grant: Grant | None) -> None:
        if grant is None:
            self._revoked("coord")
            return self.send_coord(frames[0], Error(f"forbidden: {REVOKED}", "forbidden"))
        self._on_coord(frames, grant)

    def _on_coord(self, frames: list[bytes], grant: Grant | None = None) -> None:
        identity = frames[0]
        if len(frames) != 2:
            return self.send_coord(identity, Error("expected exactly one frame", "bad_message"))
        try:
            msg = coord_decoder.decode(frames[1])
        except DECODE_ERRORS as exc:
            self.intake.count_rejected("bad_coord")
            return self.send_coord(identity, Error(f"unreadable coord message: {exc}", "bad_message"))
        if grant is not None and (refusal := _refusal(grant, msg)) is not None:
            assert self.gatekeeper is not None
            self.gatekeeper.forbidden[refusal[0]] += 1
            return self.send_coord(identity, Error(f"forbidden: {refusal[1]}", "forbidden"))
        now = time.monotonic()
        if isinstance(msg, ADMIN_REQUESTS):
            return self.send_coord(identity, Reply(admin.handle(self, msg)))
        if isinstance(msg, Read):  # a live consumer (the gateway's /v1/subscribe)
            rc = self.config.router
            try:
                return self.send_coord(identity, journalread.read(self.journal, msg, rc.fetch_limit, rc.fetch_bytes))
            except OSError as exc:  # a failing disk: the consumer asks again
                return self.send_coord(identity, Error(f"storage unavailable: {exc}", "storage_unavailable"))
        group = self.coordinator.groups.get(getattr(msg, "group", ""))
        if group is None:
            return self.send_coord(identity, Error(f"unknown group {getattr(msg, 'group', '')!r}", "unknown_group"))
        if isinstance(msg, Join):
            for ident, out in self.coordinator.join(group, msg.member, identity, now, msg.host, msg.pid, msg.holding):
                self.send_coord(ident, out)
        elif isinstance(msg, Fetch):
            self.telemetry.fetches.inc((group.name,))
            self.send_coord(identity, self.fetch(group, msg))
        elif isinstance(msg, MemberExited):  # from the launcher: the member is gone
            self.send_coord(identity, Reply(admin.member_exited(self, group, msg, now)))
        elif isinstance(msg, DeadLetter):  # stored even if the member was dropped meanwhile
            admin.store_dead_letter(self, msg, identity)
        elif not isinstance(msg, MEMBER_MESSAGES):  # one the router sends, come back
            self.send_coord(identity, Error(f"unexpected {type(msg).__name__} on coord", "bad_message"))
        elif not self.coordinator.seen(group, msg.member, None if isinstance(msg, Heartbeat) else identity, now):
            if not isinstance(msg, Leave):
                self.send_coord(identity, Error(f"{msg.member} is not a member of {group.name}", "unknown_member"))
        elif isinstance(msg, Heartbeat):
            if msg.stats:
                self.member_stats[(group.name, msg.member)] = msg.stats
            if msg.metrics:
                self.member_metrics[(group.name, msg.member)] = msg.metrics
            info = group.members[msg.member]
            heads = self.heads[group.name]
            self.send_coord(identity, Pulse({p: heads[p] for p in info.view}))
        elif isinstance(msg, Ack):
            self.coordinator.ack(group, msg.member, msg.acks)
        elif isinstance(msg, Released):
            for ident, out in self.coordinator.released(group, msg.member, msg.acks, now):
                self.send_coord(ident, out)
        elif isinstance(msg, Leave):
            for ident, out in self.coordinator.leave(group, msg.member, msg.acks, now, msg.busy):
                self.send_coord(ident, out)

    def _producers_connected(self) -> int:
        """Connections on ingest and confirm (CURVE ones are counted by the gatekeeper)."""
        n = self.connections.total()
        if self.gatekeeper is not None:
            keyed = self.gatekeeper.connections
            n += sum(keyed.get(getattr(self, name), 0) for name in ("ingest", "confirm") if hasattr(self, name))
        return n

    def _routes_for(self, type_: str, only_group: str):
        routes = self.routes.routes(type_)
        return [r for r in routes if r.group == only_group] if only_group else routes

    def group_filter(self, group: str):
        """A predicate: does a journal entry belong to `group`'s streams? (Cached per
        event type: fetch and lag call it for every record they scan.)"""
        by_type: dict[str, bool] = {}
        routes = self.routes.routes

        def in_group(entry) -> bool:
            if entry.group:
                return entry.group == group
            found = by_type.get(entry.type)
            if found is None:
                found = by_type[entry.type] = any(r.group == group for r in routes(entry.type))
            return found

        return in_group

    def fetch(self, group: Group, msg: Fetch) -> Records:
        """Stream events of group/partition after `msg.after`, served from the journal.
        A reply is bounded in events (fetch_limit) and in bytes (fetch_bytes, or one
        event), and one fetch examines at most FETCH_SCAN records/bytes of journal (other
        partitions' records are skipped without a copy): the member asks again from
        `upto`, so router memory and loop time stay flat with any backlog."""
        rc = self.config.router
        limit = max(1, min(msg.limit, rc.fetch_limit))
        p, partitions = msg.partition, group.partitions
        in_group, decode = self.group_filter(group.name), entry_decoder.decode

        name = group.name
        by_type: dict[str, bool] = {}  # (in_group's answer per type, without its call)

        def want(body):
            # kept: the event alone, copied out of the read buffer (the reply holds no chunk)
            entry = decode(body)  # unreadable: read() checks the CRC (damage)
            if partition_of(entry.khash, partitions) != p:
                return None
            ok = entry.group == name if entry.group else by_type.get(entry.type)
            if ok is None:
                ok = by_type[entry.type] = in_group(entry)
            if ok:
                # a view into the read chunk is copied out (small bodies come as bytes of
                # their own: nothing to copy)
                return entry.event if type(body) is bytes else entry.event.copy()
            return None

        journal = self.journal
        records = journal.read(
            msg.after,
            limit,
            max_bytes=rc.fetch_bytes,
            want=want,
            max_scan=(max(limit * 50, 50_000), max(FETCH_SCAN_BYTES, 2 * rc.fetch_bytes)),
        )
        seqs, events = (list(column) for column in zip(*records, strict=False)) if records else ([], [])
        if set(map(type, events)) - {msgspec.Raw}:
            # a CRC-valid body that does not decode (never written so by a router): skip it
            records = [(seq, event) for seq, event in records if type(event) is msgspec.Raw]
        seqs = [seq for seq, _ in records]
        events = [event for _, event in records]
        upto = max(min(journal.read_upto, journal.last_seq), msg.after)  # never past the end (review #2)
        if not records and upto == msg.after:
            upto = max(msg.after, journal.last_seq)  # nothing readable after it
        return Records(
            group=group.name,
            partition=p,
            after=msg.after,
            upto=upto,
            seqs=seqs,
            events=events,
            complete=upto >= journal.last_seq,
        )

    def lag(self, group: Group) -> int | str:
        """Events of the group after its cursors: kept incrementally (nexus/router/backlog.py),
        so status never reads the journal in the loop."""
        return self.backlog.lag(group.name, group.cursors)


REVOKED = "this key is no longer authorized"


def _refusal(grant: Grant, msg: Coord) -> tuple[str, str] | None:
    """Why `grant` may not send `msg` on coord, as (what was asked, reason); None: it may.
    Status is any key's; the other admin requests and exit reports need an admin key;
    group messages (join, fetch, heartbeat, ack, dead letter, ...) a key of that group."""
    if isinstance(msg, StatusRequest) or grant.admin:
        return None
    if isinstance(msg, (*ADMIN_REQUESTS, MemberExited, Read)):
        return "admin", f"{type(msg).__name__} needs an admin key; {grant.name} is a {grant.role} key"
    group = getattr(msg, "group", "")
    if not grant.may_join(group):
        return "group", f"key {grant.name} may not join group {group!r}"
    return None


def main(config: Config, env: str | None = None, members_alive: bool = False, launcher_pid: int = 0) -> None:
    import signal

    from nexus.common import process
    from nexus.common.process import stop_on_signals

    process.raise_fd_limit()  # connections, segments and sockets: the soft limit is often 1024
    with _beating(blackbox.current()):  # contract imports: starting is not hanging
        router = Router(config, env)
    router.expect_rejoin = members_alive
    router.launcher_pid = launcher_pid
    stop_on_signals(router.stop_event)
    signal.signal(signal.SIGHUP, lambda *_: setattr(router, "reload_requested", True))
    router.run()
