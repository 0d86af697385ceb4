"""A member's heartbeat thread, with its own coord socket.

It is a thread so that a handler blocking the member's event loop for seconds does
not get the member declared dead; pulses (stream heads) and errors are handed to
the loop through a callback.
"""

from __future__ import annotations

import threading
from collections.abc import Callable

import zmq

from nexus.member.group import GroupClient
from nexus.protocol import transport
from nexus.protocol.curve import ClientKeys
from nexus.protocol.wire import Coord


class HeartbeatThread:
    def __init__(
        self,
        endpoint: str,
        client: GroupClient,
        interval: float,
        on_message: Callable[[Coord], None],
        stats: Callable[[], dict] = dict,
        curve: ClientKeys | None = None,
        metrics: Callable[[], dict] = dict,
    ):
        self.endpoint = endpoint
        self.curve = curve
        self.client = client
        self.interval = interval
        self.on_message = on_message
        self.stats = stats  # the member's counters, sent with each beat (for `nexus status`)
        self.metrics = metrics  # its metrics snapshot, sent with each beat (for scrapes)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="nexus-heartbeat", daemon=True)

    @property
    def started(self) -> bool:
        return self._thread.ident is not None

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self.started:
            self._thread.join(timeout=2)

    def _run(self) -> None:
        ctx: zmq.Context = zmq.Context.instance()
        sock = transport.connect(
            ctx, zmq.DEALER, self.endpoint, linger_ms=0, identity=self.client.identity("hb"), curve=self.curve
        )
        try:
            while not self._stop.is_set():
                sock.send(self.client.heartbeat(self.stats(), self.metrics()))
                if sock.poll(int(self.interval * 1000)):
                    while sock.poll(0):
                        msg = self.client.read(sock.recv())
                        if msg is None:
                            continue
                        try:
                            self.on_message(msg)
                        except RuntimeError:  # loop closed while stopping
                            return
                    self._stop.wait(max(0.0, self.interval / 2))
        finally:
            sock.close(0)
