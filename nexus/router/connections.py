"""Producers connected: peers on the router's ingest and confirm sockets, counted from
socket monitors (accepted minus disconnected connections).

The router has no producer table (a fire-mode batch carries no producer id, and a
confirm-mode id says nothing about whether its sender is still there); libzmq knows the
connections, and tells a monitor. CURVE sockets already have a monitor, the gatekeeper's
(libzmq allows one per socket): it counts their connections the same way
(Gatekeeper.connections) and the router adds both.
"""

from __future__ import annotations

import zmq
from zmq.utils.monitor import parse_monitor_message

EVENTS = zmq.EVENT_ACCEPTED | zmq.EVENT_DISCONNECTED
DRAIN_MAX = 10_000  # monitor events read per tick (a monitor queues up to its HWM)


class Connections:
    """Connection counts of watched sockets; `tick()` from the owner's loop."""

    def __init__(self) -> None:
        self._monitors: dict[zmq.Socket, zmq.Socket] = {}
        self.count: dict[zmq.Socket, int] = {}

    def watch(self, sock: zmq.Socket) -> None:
        """Count `sock`'s connections (call after the bind)."""
        self._monitors[sock] = sock.get_monitor_socket(EVENTS)
        self.count[sock] = 0

    def tick(self) -> None:
        for sock, mon in self._monitors.items():
            for _ in range(DRAIN_MAX):
                try:
                    frames = mon.recv_multipart(zmq.NOBLOCK)
                except zmq.Again:
                    break
                self.count[sock] = track(self.count[sock], parse_monitor_message(frames)["event"])

    def total(self) -> int:
        return sum(self.count.values())

    def stop(self) -> None:
        for sock, mon in self._monitors.items():
            try:
                sock.disable_monitor()
            except zmq.ZMQError:
                pass
            mon.close(0)
        self._monitors.clear()
        self.count.clear()


def track(count: int, event: int) -> int:
    """A connection count after one monitor event."""
    if event == zmq.EVENT_ACCEPTED:
        return count + 1
    if event == zmq.EVENT_DISCONNECTED:
        return max(count - 1, 0)
    return count
