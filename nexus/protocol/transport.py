"""Every ZeroMQ socket in Nexus is made here, so socket options live in one place.

Bound sockets cap message size (MAXMSGSIZE) so a hostile peer cannot make the
router allocate gigabytes; every socket has linger and high-water marks set, and
connecting sockets use ZMTP heartbeats to notice a dead peer. With keys (curve.py),
a tcp:// socket gets CURVE options: server ones when bound, client ones when connected;
ipc:// and inproc:// sockets stay NULL (file permissions guard them).
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from typing import Any, TypeVar

import zmq

from nexus.common import private
from nexus.protocol.curve import ClientKeys, ServerKeys, dial, serve

MAX_MESSAGE_BYTES = 64 * 2**20  # one producer batch / one fetch reply, at most
PUBLISH_HWM = 1_000  # deliveries (batches) queued per subscriber before ZMQ drops, in the
# router and again in the member: their memory (10,000 let a slow member's pipes hold
# ~100 MB on each side, docs/performance.md); a member that falls behind catches up from
# the journal
LINGER_MS = 1000  # time to flush on close, then give up
DEFAULT_HWM = 100_000  # messages queued per peer before send blocks or drops

S = TypeVar("S", bound=zmq.Socket)


def _prepare_ipc(endpoint: str) -> None:
    if endpoint.startswith("ipc://"):
        path = endpoint[len("ipc://") :]
        parent = os.path.dirname(path)
        if parent:
            private.makedirs(parent)  # 0700 (nexus/common/private.py)


def _common(sock: zmq.Socket, linger_ms: int) -> None:
    sock.setsockopt(zmq.LINGER, linger_ms)
    sock.setsockopt(zmq.RECONNECT_IVL, 50)
    sock.setsockopt(zmq.RECONNECT_IVL_MAX, 2000)


def bind(
    ctx: zmq.Context,
    kind: int,
    endpoint: str,
    *,
    max_message: int = MAX_MESSAGE_BYTES,
    hwm: int = DEFAULT_HWM,
    linger_ms: int = LINGER_MS,
    curve: ServerKeys | None = None,
) -> zmq.Socket:
    """A socket the router or launcher owns. Raises zmq.ZMQError if the address is taken.
    With `curve`, a tcp:// bind is a CURVE server (its context needs a ZAP handler)."""
    sock = ctx.socket(kind)
    if curve is not None and endpoint.startswith("tcp://"):
        serve(sock, curve)
    _common(sock, linger_ms)
    sock.setsockopt(zmq.MAXMSGSIZE, max_message)
    sock.setsockopt(zmq.RCVHWM, hwm)
    sock.setsockopt(zmq.SNDHWM, hwm)
    if kind == zmq.ROUTER:
        sock.setsockopt(zmq.ROUTER_HANDOVER, 1)  # a reconnecting peer keeps its identity
    _prepare_ipc(endpoint)
    try:
        sock.bind(endpoint)
        path = endpoint[len("ipc://") :] if endpoint.startswith("ipc://") else ""
        if path and not path.startswith("@"):  # a file (not Linux's abstract namespace)
            private.restrict_socket(path)  # only the owner (or security.ipc_group) may connect
    except (zmq.ZMQError, OSError):
        sock.close(0)
        raise
    return sock


def connect(
    ctx: zmq.Context[S],
    kind: int,
    endpoint: str,
    *,
    hwm: int = DEFAULT_HWM,
    identity: bytes | None = None,
    linger_ms: int = LINGER_MS,
    max_message: int = MAX_MESSAGE_BYTES,
    curve: ClientKeys | None = None,
) -> S:
    """A socket a producer, member or CLI uses to reach a bound endpoint (an asyncio
    socket from an asyncio context); with `curve`, a tcp:// one is a CURVE client."""
    sock = ctx.socket(kind)
    if curve is not None and endpoint.startswith("tcp://"):
        dial(sock, curve)
    _common(sock, linger_ms)
    sock.setsockopt(zmq.MAXMSGSIZE, max_message)
    sock.setsockopt(zmq.RCVHWM, hwm)
    sock.setsockopt(zmq.SNDHWM, hwm)
    sock.setsockopt(zmq.HEARTBEAT_IVL, 1000)
    sock.setsockopt(zmq.HEARTBEAT_TIMEOUT, 3000)
    if identity is not None:
        sock.setsockopt(zmq.IDENTITY, identity)
    sock.connect(endpoint)
    return sock


def publisher(ctx: zmq.Context, endpoint: str, curve: ServerKeys | None = None) -> zmq.Socket:
    sock = bind(ctx, zmq.XPUB, endpoint, hwm=PUBLISH_HWM, linger_ms=0, curve=curve)
    return sock


def subscriber(ctx: zmq.Context, endpoint: str, curve: ClientKeys | None = None) -> zmq.Socket:
    return connect(ctx, zmq.SUB, endpoint, hwm=PUBLISH_HWM, linger_ms=0, curve=curve)


def topic_payloads(sub: zmq.Socket, topic: bytes, done: Callable[[], bool], poll_ms: int = 200) -> Iterator[bytes]:
    """The payload frame of every `[topic, payload]` message on a subscribed SUB socket
    (anything else skipped), until `done()`: it is asked between polls, so a stop is seen
    within `poll_ms` even when nothing arrives (the tail readers' threads)."""
    while not done():
        if not sub.poll(poll_ms):
            continue
        frames = sub.recv_multipart()
        if len(frames) != 2 or frames[0] != topic:
            continue
        yield frames[1]


def request(
    ctx: zmq.Context, endpoint: str, payload: bytes, timeout: float, curve: ClientKeys | None = None
) -> bytes | None:
    """One request/answer over a fresh DEALER; None when nobody answered in time."""
    sock = connect(ctx, zmq.DEALER, endpoint, linger_ms=0, curve=curve)
    try:
        sock.send(payload)
        if sock.poll(int(timeout * 1000), zmq.POLLIN):
            return sock.recv()
        return None
    finally:
        sock.close(0)


PROBE_TIMEOUT = 0.5


def unreachable(endpoint: str, timeout: float = PROBE_TIMEOUT) -> str | None:
    """Why nothing can be listening at a bound endpoint, or None when something may be.

    One plain connect, no ZeroMQ: an ipc socket file that is missing or refuses, a tcp
    port that refuses or does not accept within `timeout`. The CLI asks this before it
    waits seconds for an answer, so "no pipeline" fails at once while a live but slow
    peer still gets its full timeout (ZeroMQ drops the bare connection silently)."""
    import socket

    address: str | tuple[Any, ...]
    if endpoint.startswith("ipc://"):
        path = endpoint[len("ipc://") :]
        if not os.path.exists(path):
            return f"no socket file {path}"
        family, address = socket.AF_UNIX, path
    elif endpoint.startswith("tcp://"):
        host, _, port = endpoint[len("tcp://") :].rpartition(":")
        host = host.strip("[]")
        if host in ("*", "0.0.0.0", ""):
            host = "127.0.0.1"
        elif host == "::":
            host = "::1"
        try:
            infos = socket.getaddrinfo(host, int(port), type=socket.SOCK_STREAM)
        except (OSError, ValueError) as exc:
            return f"cannot resolve {host}:{port}: {exc}"
        family, address = infos[0][0], infos[0][4]
    else:
        return None  # inproc and others: nothing to probe from outside
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.settimeout(timeout)
    try:
        sock.connect(address)
    except ConnectionRefusedError:
        return "connection refused"
    except TimeoutError:
        return f"no connection within {timeout:g}s"
    except OSError as exc:
        return exc.strerror or str(exc)
    finally:
        sock.close()
    return None
