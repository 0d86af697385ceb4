"""Typed request clients: `CoordClient` for the router's requests on `coord` (status,
journal replay, dead letters, reload, metrics, a member's exit) and `ControlClient` for the
launcher's on `control` (status, scale, stop, reload).

Each request is encoded, sent over a fresh DEALER, and its answer decoded into its
type: a coord `Reply`'s data, or the launcher's reply map. No answer within the
timeout raises PeerError (exit code 5); with `probe=True` a peer that cannot be
listening (no socket file, a refused port) raises it at once instead of after the
timeout. A coord `Error` answer raises NexusError with the router's reason.
"""

from __future__ import annotations

from typing import Any

import msgspec
import zmq

from nexus.errors import NexusError, PeerError
from nexus.protocol import transport
from nexus.protocol.curve import ClientKeys
from nexus.protocol.wire import (
    ControlReply,
    ControlRequest,
    Coord,
    DlqRequest,
    Error,
    MemberExited,
    MetricsRequest,
    ReloadRequest,
    ReplayRequest,
    StatusRequest,
    control_reply_decoder,
    coord_reply_decoder,
    encoder,
)

REQUEST_TIMEOUT = 3.0  # seconds; a live peer answers at once


def require_listening(endpoint: str, who: str, hint: str = "") -> None:
    """Raise PeerError at once when nothing can be listening at `endpoint` (see
    transport.unreachable), instead of after a timeout."""
    why = transport.unreachable(endpoint)
    if why:
        raise PeerError(f"{who} at {endpoint} is not running ({why}){hint}")


class _Client:
    who = ""  # the peer, in error messages
    silent_hint = ""  # appended when it does not answer

    def __init__(
        self,
        endpoint: str,
        timeout: float = REQUEST_TIMEOUT,
        *,
        probe: bool = False,
        not_running_hint: str = "",
        ctx: zmq.Context | None = None,
        curve: ClientKeys | None = None,
    ):
        self.endpoint = endpoint
        self.curve = curve
        self.timeout = timeout
        self.probe = probe
        self.not_running_hint = not_running_hint
        self.ctx = ctx

    def _ask(self, payload: bytes, timeout: float | None) -> bytes:
        if self.probe:
            require_listening(self.endpoint, self.who, self.not_running_hint)
        wait = self.timeout if timeout is None else timeout
        raw = transport.request(self.ctx or zmq.Context.instance(), self.endpoint, payload, wait, self.curve)
        if raw is None:
            raise PeerError(f"{self.who} at {self.endpoint} did not answer within {wait:g}s{self.silent_hint}")
        return raw

    def _unreadable(self, exc: Exception) -> NexusError:
        return NexusError(f"unreadable answer from the {self.who} at {self.endpoint}: {exc}")


class CoordClient(_Client):
    """The router's requests. Each returns the `Reply` data; a refusal the router
    answers inside it ({"error": ...}: an unknown group, a busy store) is left to the
    caller, as each command reports it its own way."""

    who = "router"
    silent_hint = " (is the pipeline running?)"

    def request(self, msg: Coord, timeout: float | None = None) -> dict[str, Any]:
        raw = self._ask(encoder.encode(msg), timeout)
        try:
            reply = coord_reply_decoder.decode(raw)
        except msgspec.MsgspecError as exc:
            raise self._unreadable(exc) from None
        if isinstance(reply, Error):
            raise NexusError(f"router: {reply.reason}")
        return reply.data

    def status(self, timeout: float | None = None) -> dict[str, Any]:
        return self.request(StatusRequest(), timeout)

    def metrics(self, timeout: float | None = None) -> dict[str, Any]:
        """{"router": snapshot, "members": {"GROUP/MEMBER": snapshot}} (nexus/common/metrics.py);
        members that left are not in it. Cheap for the router: fine once a second."""
        return self.request(MetricsRequest(), timeout)

    def replay(self, group: str, from_seq: int = 0, from_time: float = 0.0) -> dict[str, Any]:
        """Rewind `group` to `from_seq` (or to the first event at `from_time`)."""
        return self.request(ReplayRequest(group=group, from_seq=from_seq, from_time=from_time))

    def dead_letters(
        self,
        action: str,
        ids: list[int] | None = None,
        group: str | None = None,
        type: str | None = None,
        all: bool = False,
        after: int = 0,
        limit: int = 0,
    ) -> dict[str, Any]:
        """list | show | replay | purge. A replay by group or `all` with a `limit` does
        one page: the rows with id > `after`, at most `limit` (see admin.dlq)."""
        return self.request(
            DlqRequest(action=action, ids=ids or [], group=group, type=type, all=all, after=after, limit=limit)
        )

    def reload(self, config: bytes = b"", timeout: float | None = None) -> dict[str, Any]:
        """Apply `config` (config.to_bytes of a validated one), or re-read the file."""
        return self.request(ReloadRequest(config=config), timeout)

    def member_exited(self, msg: MemberExited, timeout: float | None = None) -> dict[str, Any]:
        return self.request(msg, timeout)


class ControlClient(_Client):
    """The launcher's requests; each returns its reply map (`ControlReply`), "ok" False
    with an "error" when the launcher refused."""

    who = "launcher"
    silent_hint = " (is `python -m nexus.launch` running with this config?)"

    def request(self, req: ControlRequest, timeout: float | None = None) -> ControlReply:
        raw = self._ask(encoder.encode(req), timeout)
        try:
            return control_reply_decoder.decode(raw)
        except msgspec.MsgspecError as exc:
            raise self._unreadable(exc) from None

    def status(self, timeout: float | None = None) -> ControlReply:
        return self.request(ControlRequest("status"), timeout)

    def scale(self, group: str, n: int) -> ControlReply:
        return self.request(ControlRequest("scale", group=group, n=n))

    def stop(self) -> ControlReply:
        return self.request(ControlRequest("stop"))

    def reload(self, dry_run: bool = False, timeout: float | None = None) -> ControlReply:
        return self.request(ControlRequest("reload", dry_run=dry_run), timeout)
