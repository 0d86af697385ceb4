"""HTTP bodies and stream messages -> wire events.

A body (or a stream message) is one event object or an array of them, JSON or msgpack.
The array is split first and each element decoded on its own, so one bad event is that
event's `rejected: malformed` and not the whole request's 400; only a body that is not
JSON (msgpack) at all, or neither an object nor an array, is refused whole.

Each event is re-encoded as the wire's msgpack `Event` (id and time filled in when
absent); the router then checks it exactly as a ZeroMQ producer's (size, envelope,
contract, rate), so the gateway holds no second copy of those rules.
"""

from __future__ import annotations

import time
from typing import Any

import msgspec

from nexus.protocol.events import Event, new_id

JSON = "application/json"
MSGPACK = ("application/msgpack", "application/x-msgpack", "application/vnd.msgpack")


class InEvent(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """What a client sends: the wire event with `id` and `time` optional."""

    type: str
    source: str
    payload: Any
    id: str | None = None
    time: float | None = None
    key: str | None = None
    priority: int = 5
    correlation_id: str | None = None
    v: int = 1


class BodyError(ValueError):
    """The whole body is unreadable: a 400 with this one line."""


class Parsed(msgspec.Struct):
    """One element of the body: its event, or why it is not one."""

    event: InEvent | None
    error: str = ""
    id: str = ""  # the client's id when it could be read, else the one given to it


_json_items = msgspec.json.Decoder(list[msgspec.Raw])
_json_event = msgspec.json.Decoder(InEvent)
_mp_items = msgspec.msgpack.Decoder(list[msgspec.Raw])
_mp_event = msgspec.msgpack.Decoder(InEvent)
_json_id = msgspec.json.Decoder(dict[str, Any])
_mp_id = msgspec.msgpack.Decoder(dict[str, Any])
_encode = msgspec.msgpack.Encoder().encode
_ERRORS = (msgspec.DecodeError, msgspec.ValidationError, UnicodeDecodeError, RecursionError)


def is_msgpack(content_type: str) -> bool:
    return content_type in MSGPACK


def split(body: bytes, msgpack: bool) -> tuple[list[Parsed], bool]:
    """(one Parsed per event, whether the body was an array)."""
    items_dec: Any
    event_dec: Any
    id_dec: Any
    if msgpack:
        is_array = bool(body) and (0x90 <= body[0] <= 0x9F or body[0] in (0xDC, 0xDD))
        items_dec, event_dec, id_dec = _mp_items, _mp_event, _mp_id
    else:
        head = body.lstrip()[:1]
        is_array = head == b"["
        items_dec, event_dec, id_dec = _json_items, _json_event, _json_id
        if head not in (b"[", b"{"):
            raise BodyError("the body must be a JSON event object or an array of them")
    kind = "msgpack" if msgpack else "JSON"
    try:
        if not is_array:
            return [Parsed(event_dec.decode(body))], False
        items = items_dec.decode(body)
    except msgspec.ValidationError:
        return [_one(msgspec.Raw(body), event_dec, id_dec)], False  # readable, but not an event
    except _ERRORS as exc:
        raise BodyError(f"malformed {kind}: {exc}") from None
    return [_one(item, event_dec, id_dec) for item in items], is_array


def _one(raw: msgspec.Raw, event_dec: Any, id_dec: Any) -> Parsed:
    try:
        return Parsed(event_dec.decode(raw))
    except _ERRORS as exc:
        given = ""
        try:
            value = id_dec.decode(raw).get("id")
            given = value if isinstance(value, str) else ""
        except _ERRORS:
            pass
        return Parsed(None, f"malformed: {exc}", given or new_id())


def wire(ev: InEvent) -> tuple[str, bytes, str]:
    """(event id, the wire Event's msgpack bytes, "") or (event id, b"", why not): a JSON
    integer past 64 bits has no msgpack form."""
    event_id = ev.id or new_id()
    when = ev.time if ev.time is not None else time.time()
    event = Event(ev.type, ev.source, ev.payload, event_id, when, ev.key, ev.priority, ev.correlation_id, ev.v)
    try:
        return event_id, _encode(event), ""
    except (OverflowError, TypeError, msgspec.EncodeError) as exc:
        return event_id, b"", f"malformed: {exc}"
