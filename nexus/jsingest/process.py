"""The ingest process: the `router` role of `engine: nats`.

Producers connect exactly as to the embedded router (fire mode PUSHes to `ingest`,
confirm mode talks to the `confirm` ROUTER, same ProducerBatch / ProducerReply, same
CURVE keys); their events are validated by the router's intake and stored in JetStream
(nexus/jsingest/store.py). `coord` answers the launcher's and CLI's requests from the
cluster (nexus/jsingest/admin.py); members of this engine use JetStream, not coord.

One asyncio loop runs the ZeroMQ sockets (zmq.asyncio) and the NATS connection.
Back-pressure: a reader takes its next message only while fewer than `max_pending`
publishes are in flight, so a slow or failing cluster stops intake (producers' windows
and socket queues fill) instead of growing this process.

Any NATS client may produce too: see `nats_intake` below.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import signal
import threading
import time
from typing import Any, cast

import msgspec
import structlog
import zmq
import zmq.asyncio

from nexus.common import blackbox
from nexus.common.datalock import ROUTER_LOCK, DataDirLock
from nexus.config import Config
from nexus.errors import ConfigError
from nexus.jetstream import connect, setup
from nexus.jsingest.admin import Admin
from nexus.jsingest.publisher import Publisher
from nexus.jsingest.store import Store
from nexus.protocol import curve, transport
from nexus.protocol.events import DECODE_ERRORS, Contracts
from nexus.protocol.gatekeeper import Gatekeeper, Grant, KeyRing
from nexus.protocol.wire import (
    Ack,
    Coord,
    DeadLetter,
    DlqRequest,
    Error,
    Fetch,
    Heartbeat,
    Join,
    Leave,
    MemberExited,
    MetricsRequest,
    ProducerReply,
    Read,
    Released,
    ReloadRequest,
    ReplayRequest,
    StatusRequest,
    coord_decoder,
    encoder,
)
from nexus.router.intake import Intake
from nexus.router.ratelimit import RateLimiter
from nexus.router.server import INGEST_HWM, REVOKED, _beating, _refusal

log = structlog.get_logger("nexus.jsingest")

ADMIN_REQUESTS = (StatusRequest, MetricsRequest, DlqRequest, ReplayRequest, ReloadRequest, Read, MemberExited)
MEMBER_MESSAGES = (Join, Heartbeat, Ack, Released, Leave, Fetch, DeadLetter)
WRONG_ENGINE = "this pipeline runs engine nats: members of engine nats use JetStream, not coord"
MAX_PENDING = 4096  # publishes in flight before the readers pause
BEAT_EVERY = 0.2
DRAIN_FOR = 5.0  # seconds at exit for publishes in flight (at most shutdown_timeout)
CONNECT_RETRY = 0.5
# room for headers within the server's max_payload (a msg id, or a rejected event's
# reason and source, which are cut at 1,000 and 128 characters)
HEADER_ROOM = 2048


class IngestProcess:
    def __init__(self, config: Config, env: str | None = None, max_pending: int = MAX_PENDING):
        self.config, self.env, self.max_pending = config, env, max_pending
        rc = config.router
        self.contracts = Contracts.from_modules(config.contracts, config.contracts_untyped)
        self.intake = Intake(self.contracts, RateLimiter(rc.rate_limits), rc.max_event_bytes, rc.max_batch)
        endpoints = curve.server_endpoints(config)
        curve.check_binds(
            config, {k: v for k, v in endpoints.items() if k in ("router.ingest", "router.confirm", "router.coord")}
        )
        self.curve = curve.server_keys(config)
        self.gatekeeper: Gatekeeper | None = None
        self.store: Store | None = None
        self.admin: Admin | None = None
        self.ready = False
        self.stopped = False  # run() returned: the data dir lock is free again
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stop: asyncio.Event | None = None
        self._stop_early = False
        self._replies: set[asyncio.Task] = set()  # replies waiting for PubAcks, admin answers
        self._last_reply: dict[bytes, asyncio.Task] = {}  # confirm connection -> its latest reply
        self._keyed_socks: set[zmq.asyncio.Socket] = set()  # CURVE servers: messages carry their key

    # -- control from other threads (tests) and signals ---------------------------------------
    def stop(self) -> None:
        """Ask for an orderly stop (thread-safe)."""
        loop, stop = self._loop, self._stop
        if loop is None or stop is None:
            self._stop_early = True
            return
        with contextlib.suppress(RuntimeError):  # the loop ended already
            loop.call_soon_threadsafe(stop.set)

    def intake_stats(self) -> dict[str, Any]:
        stats: dict[str, Any] = self.store.stats() if self.store is not None else {"engine": "nats"}
        stats["ready"] = self.ready
        stats["security"] = {"curve": self.curve is not None}
        return stats

    def run(self, signals: bool = False, signalled: threading.Event | None = None) -> None:
        """`signals`: SIGTERM/SIGINT stop it (main thread only); `signalled`: set by the
        signal handler that ran before the loop had its own."""
        # one router per data dir, whatever its engine
        lock = DataDirLock(self.config.data_dir, ROUTER_LOCK, "router").acquire()
        try:
            asyncio.run(self._main(signals, signalled))
        finally:
            lock.release()
            self.stopped = True

    # -- the loop --------------------------------------------------------------------------
    async def _main(self, signals: bool, signalled: threading.Event | None) -> None:
        self._loop = asyncio.get_running_loop()
        self._stop = asyncio.Event()
        if self._stop_early:
            self._stop.set()
        if signals:
            for signum in (signal.SIGTERM, signal.SIGINT):
                self._loop.add_signal_handler(signum, self._stop.set)
            # reloads come from the launcher as ReloadRequest on coord
            self._loop.add_signal_handler(
                signal.SIGHUP, lambda: log.warning("sighup_ignored", reason="use nexus reload")
            )
        if signalled is not None and signalled.is_set():
            self._stop.set()
        beat = asyncio.ensure_future(self._beat())
        ctx = zmq.Context()
        actx = zmq.asyncio.Context.shadow(ctx.underlying)
        tasks: list[asyncio.Task] = []
        sockets: list[zmq.asyncio.Socket] = []
        nc = None
        try:
            if self.curve is not None:  # the ZAP handler before the first CURVE bind
                keys = KeyRing(curve.authorized_keys_dir(self.config), self.curve.pair)
                self.gatekeeper = Gatekeeper(ctx, keys).start()
            # coord first: the launcher's status probe is answered while the cluster forms
            self.coord = self._bind(actx, zmq.ROUTER, self.config.coord)
            sockets.append(self.coord)
            tasks.append(asyncio.ensure_future(self._read_coord()))
            nc = await self._connect()
            if nc is None:
                return
            self._fit_payload(nc.max_payload)
            js = nc.jetstream(publish_async_max_pending=self.max_pending * 2)
            names = await self._until_stopped(setup.ensure(js, self.config, log=log))
            if names is None:
                return
            publisher = Publisher(js, self.max_pending, log)
            self.store = Store(self.intake, publisher, names)
            self.admin = Admin(self.config, nc, js, names, self.intake_stats)
            self.ingest = self._bind(actx, zmq.PULL, self.config.ingest, hwm=INGEST_HWM)
            self.confirm = self._bind(actx, zmq.ROUTER, self.config.confirm)
            sockets += [self.ingest, self.confirm]
            readers = [asyncio.ensure_future(self._read_ingest()), asyncio.ensure_future(self._read_confirm())]
            sub = await nc.subscribe(names.ingest_subject, queue=names.ingest_queue, cb=self._on_request)
            self.ready = True
            log.info(
                "ingest_ready",
                ingest=self.config.ingest,
                confirm=self.config.confirm,
                coord=self.config.coord,
                servers=self.config.nats.servers,
                stream=names.stream,
                curve=self.curve is not None,
            )
            await self._until_stopped(self._first_failure([*readers, *tasks]))
            self.ready = False
            # stop taking, finish what was taken: publishes, then the ACKs that wait for them
            for task in readers:
                task.cancel()
            await asyncio.gather(*readers, return_exceptions=True)
            await sub.unsubscribe()
            dropped = await publisher.drain(min(DRAIN_FOR, float(self.config.shutdown_timeout)))
            if self._replies:
                await asyncio.wait(set(self._replies), timeout=1.0)
            log.info("ingest_stopped", **{**_counts(self.intake_stats()), "dropped": dropped})
        finally:
            for task in [*tasks, *self._replies, beat]:
                task.cancel()
            await asyncio.gather(*tasks, *self._replies, beat, return_exceptions=True)
            if nc is not None:
                await nc.close()
            for sock in sockets:
                sock.close(linger=500)  # replies just sent still go out
            if self.gatekeeper is not None:
                self.gatekeeper.stop()
            ctx.term()

    def _fit_payload(self, max_payload: int) -> None:
        """An event the server cannot take (max_payload) would be retried for ever and
        hold every publish behind it: such events are refused as too_large instead."""
        fits = max_payload - HEADER_ROOM
        if self.intake.max_event_bytes > fits:
            log.info(
                "max_event_bytes_lowered",
                configured=self.intake.max_event_bytes,
                effective=fits,
                reason=f"the NATS server's max_payload is {max_payload} bytes (headers need {HEADER_ROOM})",
            )
            self.intake.max_event_bytes = fits

    @staticmethod
    async def _first_failure(tasks: list[asyncio.Task]) -> None:
        """Raise what ended a reader (each catches a message's errors: this is a socket or
        a bug), so the process exits and the launcher starts it again instead of it
        running on deaf."""
        done, _ = await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
        for task in done:
            task.result()
        raise RuntimeError("a reader ended")

    async def _until_stopped(self, work):
        """`work`'s result, or None when a stop comes first."""
        assert self._stop is not None
        job = asyncio.ensure_future(work)
        stop = asyncio.ensure_future(self._stop.wait())
        await asyncio.wait({job, stop}, return_when=asyncio.FIRST_COMPLETED)
        stop.cancel()
        if job.done():
            return job.result()
        job.cancel()
        await asyncio.gather(job, return_exceptions=True)
        return None

    async def _connect(self):
        """The cluster connection; a cluster not reachable yet is waited for."""
        assert self._stop is not None
        while not self._stop.is_set():
            try:
                return await connect.connect(self.config, "nexus-ingest")
            except Exception as exc:  # nats-py raises several kinds for "not there yet"
                log.info("nats_unreachable", servers=self.config.nats.servers, error=repr(exc))
                try:
                    await asyncio.wait_for(self._stop.wait(), CONNECT_RETRY)
                except TimeoutError:
                    pass
        return None

    async def _beat(self) -> None:
        """The launcher's hang detection reads the beats; the gatekeeper re-reads the
        authorized keys when due (a revoked key's messages are refused from then on:
        its grant is gone)."""
        box = blackbox.current()
        while True:
            if box is not None:
                box.beat()
            if self.gatekeeper is not None:
                revoked = self.gatekeeper.tick(time.monotonic())
                if revoked:
                    log.warning("keys_revoked", keys=sorted(revoked))
            await asyncio.sleep(BEAT_EVERY)

    def _bind(
        self, actx: zmq.asyncio.Context, kind: int, endpoint: str, hwm: int = transport.DEFAULT_HWM
    ) -> zmq.asyncio.Socket:
        try:
            # (an asyncio socket: made by an asyncio context)
            sock = cast("zmq.asyncio.Socket", transport.bind(actx, kind, endpoint, hwm=hwm, curve=self.curve))
        except zmq.ZMQError as exc:
            raise ConfigError(f"ingest cannot bind {endpoint}: {exc}") from None
        if self.gatekeeper is not None and endpoint.startswith("tcp://"):
            self._keyed_socks.add(sock)
        return sock

    async def _recv(self, sock: zmq.asyncio.Socket) -> tuple[list[bytes], Grant | None, bool]:
        """(frames, the sender's key, keyed): with CURVE the key comes with the frames."""
        if sock not in self._keyed_socks:
            return await sock.recv_multipart(), None, False
        frames = await sock.recv_multipart(copy=False)
        assert self.gatekeeper is not None
        return [f.bytes for f in frames], self.gatekeeper.grant(frames[-1]), True

    # -- producers ------------------------------------------------------------------------
    async def _read_ingest(self) -> None:
        assert self.store is not None
        store, publisher = self.store, self.store.publisher
        while True:
            await publisher.room()
            frames, grant, keyed = await self._recv(self.ingest)
            if keyed and grant is None:
                self._forbidden("revoked_ingest")
            elif len(frames) != 1:
                self.intake.count_rejected("bad_batch")
            else:
                self._guard(store.take, frames[0], False, grant)

    async def _read_confirm(self) -> None:
        assert self.store is not None
        store, publisher = self.store, self.store.publisher
        while True:
            await publisher.room()
            frames, grant, keyed = await self._recv(self.confirm)
            identity = frames[0]
            if keyed and grant is None:
                self._forbidden("revoked_confirm")
                await self._send(self.confirm, identity, ProducerReply(error=f"forbidden: {REVOKED}"))
            elif len(frames) != 2:
                self.intake.count_rejected("bad_batch")
                await self._send(self.confirm, identity, ProducerReply(error="expected exactly one frame per message"))
            else:
                taken = self._guard(store.confirm, frames[1], grant)
                if taken is not None:
                    self._spawn_reply(identity, *taken)

    def _guard(self, handler, *args):
        try:
            return handler(*args)
        except Exception:  # the ingest never dies of one message
            log.exception("message_failed")
            self.intake.count_rejected("internal")
            return None

    def _spawn_reply(self, identity: bytes, outcome, waits) -> None:
        """Answer once stored, and after the previous answer to the same connection: a
        later ACK overtaking an earlier reply would settle that reply's NACKed events
        as accepted in the SDK (it pops everything up to the ACK)."""
        previous = self._last_reply.get(identity)

        async def reply() -> None:
            if previous is not None and not previous.done():
                await asyncio.wait([previous])
            answer = await Store.reply_when_stored(outcome, waits)
            if answer is not None:
                await self._send(self.confirm, identity, answer)

        task = asyncio.ensure_future(reply())
        self._last_reply[identity] = task
        self._replies.add(task)
        task.add_done_callback(functools.partial(self._replied, identity))

    def _replied(self, identity: bytes, task: asyncio.Task) -> None:
        self._replies.discard(task)
        if self._last_reply.get(identity) is task:
            del self._last_reply[identity]

    async def _send(self, sock: zmq.asyncio.Socket, identity: bytes, msg: Any) -> None:
        """Never waits: a gone or backed-up peer asks again."""
        try:
            await sock.send_multipart((identity, encoder.encode(msg)), zmq.NOBLOCK)
        except zmq.ZMQError:
            pass

    def _forbidden(self, what: str) -> None:
        assert self.gatekeeper is not None
        self.gatekeeper.forbidden[what] += 1

    # -- any NATS client --------------------------------------------------------------------
    async def _on_request(self, msg) -> None:
        """nats_intake: request/reply on `nexus.{stream}.in` (queue group
        `nexus-{stream}-ingest`, so several ingest processes share the load).

        Request payload: one event in wire form, the msgpack map the SDK sends (keys type,
        source, payload, id, time, and optionally key, priority, correlation_id, v; see
        nexus/protocol/events.py Event). It is validated like a producer's event
        (contracts, max_event_bytes, untyped types, rate limits by source) and stored
        like one (subject by key, `Nats-Msg-Id` = its id: a resend within
        nats.dedup_window is stored once). Reply, msgpack, after the PubAck:
            {"ok": true,  "seq": <stream seq>, "error": ""}
            {"ok": false, "seq": 0, "error": "<category>: <detail>"}   (+ "retry_after": s
                                                                       when rate limited)
        A rejected event is kept in `{stream}_REJECTED` with Nexus-Source "nats". No reply
        when the process stops before the PubAck: the client retries (same id).
        """
        assert self.store is not None
        await self.store.publisher.room()
        task = asyncio.ensure_future(self._answer_request(msg))  # the next request meanwhile
        self._replies.add(task)
        task.add_done_callback(self._replies.discard)

    async def _answer_request(self, msg) -> None:
        assert self.store is not None
        try:
            answer = await self.store.request(msg.data)
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            log.exception("request_failed")
            self.intake.count_rejected("internal")
            answer = {"ok": False, "seq": 0, "error": f"internal: {exc}"}
        if msg.reply:
            await msg.respond(msgspec.msgpack.encode(answer))

    # -- coord --------------------------------------------------------------------------------
    async def _read_coord(self) -> None:
        while True:
            frames, grant, keyed = await self._recv(self.coord)
            identity = frames[0]
            if keyed and grant is None:
                self._forbidden("revoked_coord")
                await self._send(self.coord, identity, Error(f"forbidden: {REVOKED}", "forbidden"))
                continue
            if len(frames) != 2:
                await self._send(self.coord, identity, Error("expected exactly one frame", "bad_message"))
                continue
            try:
                msg = coord_decoder.decode(frames[1])
            except DECODE_ERRORS as exc:
                self.intake.count_rejected("bad_coord")
                await self._send(self.coord, identity, Error(f"unreadable coord message: {exc}", "bad_message"))
                continue
            if grant is not None and (refusal := _refusal(grant, msg)) is not None:
                self._forbidden(refusal[0])
                await self._send(self.coord, identity, Error(f"forbidden: {refusal[1]}", "forbidden"))
            elif isinstance(msg, ADMIN_REQUESTS):
                task = asyncio.ensure_future(self._answer_admin(identity, msg))  # may read the cluster
                self._replies.add(task)
                task.add_done_callback(self._replies.discard)
            elif isinstance(msg, MEMBER_MESSAGES):
                await self._send(self.coord, identity, Error(WRONG_ENGINE, "wrong_engine"))
            else:
                await self._send(
                    self.coord, identity, Error(f"unexpected {type(msg).__name__} on coord", "bad_message")
                )

    async def _answer_admin(self, identity: bytes, msg: Coord) -> None:
        if self.admin is None:
            reply: Coord = Error("the ingest is still connecting to the NATS cluster; try again", "recovering")
        else:
            try:
                reply = await self.admin.answer(msg)
            except Exception as exc:
                log.exception("admin_failed", request=type(msg).__name__)
                reply = Error(f"{type(msg).__name__} failed: {exc}", "internal")
        await self._send(self.coord, identity, reply)


def _counts(stats: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in stats.items() if isinstance(v, int)}


def main(config: Config, env: str | None = None, members_alive: bool = False, launcher_pid: int = 0) -> None:
    """The launcher's entry for role `router` under `engine: nats` (the embedded router's
    signature; members_alive and launcher_pid do not matter here: no member state lives
    in this process, and reloads come as ReloadRequest on coord)."""
    from nexus.common import process

    del members_alive, launcher_pid
    process.raise_fd_limit()
    signalled = threading.Event()  # a SIGTERM while starting: stop as soon as the loop runs
    process.stop_on_signals(signalled)
    with _beating(blackbox.current()):  # contract imports: starting is not hanging
        ingest = IngestProcess(config, env)
    ingest.run(signals=True, signalled=signalled)
