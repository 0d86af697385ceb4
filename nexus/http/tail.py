"""The dashboard's live tail: events from the router's tail topic (like `nexus tail`;
under engine nats, from the events stream), fanned out to the connected pages, each
with its own type filter.

The router encodes the tail only while someone subscribes to it, so the SUB socket
exists only while a page watches: a thread opens it with the first watcher and closes
it after the last one left. A slow page loses tail lines (counted), never slows the
router or other pages."""

from __future__ import annotations

import asyncio
import fnmatch
import json
import threading
import time
from collections import deque
from collections.abc import Callable
from typing import Any

import msgspec
import structlog
import zmq

from nexus.config import Config
from nexus.protocol import transport
from nexus.protocol.curve import client_keys
from nexus.protocol.events import decode_wire_event, tail_record
from nexus.protocol.wire import TAIL_TOPIC, delivery_decoder

log = structlog.get_logger("nexus.http")

KEEP = 200  # tail lines a watcher holds before the oldest are dropped
PAYLOAD_CHARS = 2000  # a payload is shown up to this many characters of its JSON
LINGER = 5.0  # seconds the subscription outlives the last page
NATS_CONNECT_WAIT = 2.0  # engine nats: seconds one connection attempt may take before _done() is asked again


class Watcher:
    """One page's view: the tail lines matching its filter, and a wake-up for the
    stream handler (set on new lines and on every dashboard sample)."""

    def __init__(self, pattern: str):
        self.pattern = pattern or "*"
        self.lines: deque[dict[str, Any]] = deque(maxlen=KEEP)
        self.dropped = 0
        self.wake = asyncio.Event()

    def offer(self, line: dict[str, Any]) -> None:
        if fnmatch.fnmatchcase(line["type"], self.pattern):
            if len(self.lines) == KEEP:
                self.dropped += 1
            self.lines.append(line)
            self.wake.set()

    def take(self) -> list[dict[str, Any]]:
        lines = list(self.lines)
        self.lines.clear()
        return lines


def tail_line(seq: int, raw: bytes) -> dict[str, Any] | None:
    """One event as the page shows it (text only: the page puts it in textContent)."""
    try:
        ev = decode_wire_event(raw)
        payload = json.dumps(msgspec.msgpack.decode(ev.payload), default=str, ensure_ascii=False)
    except (msgspec.MsgspecError, UnicodeDecodeError, RecursionError, ValueError):
        return None
    return tail_record(seq, ev, payload[:PAYLOAD_CHARS])


class TailFeed:
    """The watchers and the SUB thread that feeds them (through the event loop). The
    thread lingers a few seconds after the last watcher left, so a page that reloads or
    changes its filter keeps the subscription (no gap while it would propagate again)."""

    def __init__(self, cfg: Config, loop: asyncio.AbstractEventLoop):
        self.cfg = cfg
        self.loop = loop
        self.watchers: set[Watcher] = set()
        self.lock = threading.Lock()  # the thread's decision to end vs. a new watcher
        self.thread: threading.Thread | None = None
        self.idle_since = 0.0  # monotonic time the last watcher left
        self.closed = False

    def watch(self, pattern: str) -> Watcher:
        w = Watcher(pattern)
        with self.lock:
            self.watchers.add(w)
            if self.thread is None and not self.closed:
                self.thread = threading.Thread(target=self._run, name="tail", daemon=True)
                self.thread.start()
        return w

    def unwatch(self, w: Watcher) -> None:
        with self.lock:
            self.watchers.discard(w)
            if not self.watchers:
                self.idle_since = time.monotonic()

    def close(self) -> None:
        with self.lock:
            self.closed = True
            self.watchers.clear()
            thread = self.thread
        if thread is not None:
            thread.join(2)

    def _deliver(self, lines: list[dict[str, Any]]) -> None:
        for w in list(self.watchers):
            for line in lines:
                w.offer(line)

    def _done(self) -> bool:
        """Called by the thread between polls: True (and forgotten) when it should end."""
        with self.lock:
            if self.closed or (not self.watchers and time.monotonic() - self.idle_since > LINGER):
                self.thread = None
                return True
            return False

    def _run(self) -> None:
        if self.cfg.engine == "nats":  # no router publishes a tail: read the events stream
            return self._run_nats()
        sub = transport.subscriber(zmq.Context.instance(), self.cfg.publish, curve=client_keys(self.cfg))
        sub.setsockopt(zmq.SUBSCRIBE, TAIL_TOPIC)
        deliver: Callable[[list[dict[str, Any]]], None] = self._deliver
        try:
            for payload in transport.topic_payloads(sub, TAIL_TOPIC, self._done):
                try:
                    delivery = delivery_decoder.decode(payload)
                except msgspec.MsgspecError:
                    continue
                lines = [
                    line
                    for seq, raw in zip(delivery.seqs, delivery.events, strict=False)
                    if (line := tail_line(seq, bytes(raw))) is not None
                ]
                if lines and not self.loop.is_closed():
                    self.loop.call_soon_threadsafe(deliver, lines)
        except Exception as exc:  # no tail on the pages; the next watcher starts a new thread
            log.error("tail_failed", error=str(exc))
            with self.lock:
                self.thread = None
        finally:
            sub.close(0)

    def _run_nats(self) -> None:
        try:
            asyncio.run(self._read_stream())
        except Exception as exc:  # no tail on the pages; the next watcher starts a new thread
            log.error("tail_failed", error=str(exc))
            with self.lock:
                self.thread = None

    async def _read_stream(self) -> None:
        """Engine nats: new events of every shard (not a group's replays), through an
        ordered consumer, until `_done()` (asked between waits, as between polls)."""
        from nats.errors import TimeoutError as NatsTimeout
        from nats.js import api

        from nexus.jetstream import connect
        from nexus.jetstream.names import Names

        names = Names.of(self.cfg)
        nc = None
        while nc is None:  # a cluster that does not answer: retried while pages watch
            if self._done():
                return
            try:
                nc = await asyncio.wait_for(connect.connect(self.cfg, "nexus-dashboard-tail"), NATS_CONNECT_WAIT)
            except (TimeoutError, OSError) as exc:
                log.info("tail_waiting_for_cluster", error=repr(exc))
        try:
            sub = await nc.jetstream().subscribe(
                f"{names.prefix}.ev.*", ordered_consumer=True, deliver_policy=api.DeliverPolicy.NEW, stream=names.stream
            )
            while not self._done():
                try:
                    msg = await sub.next_msg(timeout=0.2)
                except (NatsTimeout, TimeoutError):
                    continue
                line = tail_line(msg.metadata.sequence.stream, msg.data)
                if line is not None and not self.loop.is_closed():
                    self.loop.call_soon_threadsafe(self._deliver, [line])
        finally:
            await nc.close()
