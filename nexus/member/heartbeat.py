"""A member's heartbeat thread, with its own coord socket.

It is a thread so that a handler blocking the member's event loop for seconds does
not get the member declared dead; pulses (stream heads) and errors are handed to
the loop through a callback.
"""

from __future__ import annotations

import os
import threading

import msgspec
import zmq

from nexus.protocol import transport
from nexus.protocol.wire import Heartbeat, coord_decoder, encoder


class HeartbeatThread:
    def __init__(self, endpoint: str, group: str, member: str, interval: float, on_message, stats=None):
        self.endpoint = endpoint
        self.group, self.member = group, member
        self.interval = interval
        self.on_message = on_message
        self.stats = stats or dict
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
        ctx = zmq.Context.instance()
        sock = transport.connect(
            ctx,
            zmq.DEALER,
            self.endpoint,
            linger_ms=0,
            identity=f"{self.group}/{self.member}/{os.getpid()}/hb".encode(),
        )
        try:
            while not self._stop.is_set():
                sock.send(encoder.encode(Heartbeat(group=self.group, member=self.member, stats=self.stats())))
                if sock.poll(int(self.interval * 1000)):
                    while sock.poll(0):
                        try:
                            self.on_message(coord_decoder.decode(sock.recv()))
                        except msgspec.MsgspecError:
                            pass
                        except RuntimeError:  # loop closed while stopping
                            return
                    self._stop.wait(max(0.0, self.interval / 2))
        finally:
            sock.close(0)
