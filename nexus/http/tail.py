"""The dashboard's live tail: events from the router's tail topic (like `nexus tail`),
fanned out to the connected pages, each with its own type filter.

The router encodes the tail only while someone subscribes to it, so the SUB socket
exists only while a page watches: a thread opens it with the first watcher and closes
it after the last one left. A slow page loses tail lines (counted), never slows the
router or other pages."""

from __future__ import annotations

import asyncio
import fnmatch
import json
import threading
from collections import deque
from collections.abc import Callable
from typing import Any

import msgspec
import structlog
import zmq

from nexus.config import Config
from nexus.protocol import transport
from nexus.protocol.curve import client_keys
from nexus.protocol.events import decode_wire_event
from nexus.protocol.wire import TAIL_TOPIC, delivery_decoder

log = structlog.get_logger("nexus.http")

KEEP = 200  # tail lines a watcher holds before the oldest are dropped
PAYLOAD_CHARS = 2000  # a payload is shown up to this many characters of its JSON


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
    return {
        "seq": seq,
        "id": ev.id,
        "type": ev.type,
        "source": ev.source,
        "key": ev.key,
        "time": ev.time,
        "payload": payload[:PAYLOAD_CHARS],
    }


class TailFeed:
    """The watchers and the SUB thread that feeds them (through the event loop)."""

    def __init__(self, cfg: Config, loop: asyncio.AbstractEventLoop):
        self.cfg = cfg
        self.loop = loop
        self.watchers: set[Watcher] = set()
        self.thread: threading.Thread | None = None
        self.stop_flag = threading.Event()

    def watch(self, pattern: str) -> Watcher:
        w = Watcher(pattern)
        self.watchers.add(w)
        # (a thread told to stop may still be winding down: the new watcher gets its own)
        if self.thread is None or not self.thread.is_alive() or self.stop_flag.is_set():
            self.stop_flag = threading.Event()
            self.thread = threading.Thread(target=self._run, args=(self.stop_flag,), name="tail", daemon=True)
            self.thread.start()
        return w

    def unwatch(self, w: Watcher) -> None:
        self.watchers.discard(w)
        if not self.watchers:
            self.stop_flag.set()

    def close(self) -> None:
        self.watchers.clear()
        self.stop_flag.set()
        if self.thread is not None:
            self.thread.join(2)

    def _deliver(self, lines: list[dict[str, Any]]) -> None:
        for w in list(self.watchers):
            for line in lines:
                w.offer(line)

    def _run(self, stop: threading.Event) -> None:
        sub = transport.subscriber(zmq.Context.instance(), self.cfg.publish, curve=client_keys(self.cfg))
        sub.setsockopt(zmq.SUBSCRIBE, TAIL_TOPIC)
        deliver: Callable[[list[dict[str, Any]]], None] = self._deliver
        try:
            while not stop.is_set():
                if not sub.poll(200):
                    continue
                frames = sub.recv_multipart()
                if len(frames) != 2 or frames[0] != TAIL_TOPIC:
                    continue
                try:
                    delivery = delivery_decoder.decode(frames[1])
                except msgspec.MsgspecError:
                    continue
                lines = [
                    line
                    for seq, raw in zip(delivery.seqs, delivery.events, strict=False)
                    if (line := tail_line(seq, bytes(raw))) is not None
                ]
                if lines:
                    self.loop.call_soon_threadsafe(deliver, lines)
        except Exception as exc:  # the page shows no tail; the next watcher starts a new thread
            log.error("tail_failed", error=str(exc))
        finally:
            sub.close(0)
