"""The event, its wire codec, and the registry of payload contracts.

Wire form of an event: a msgpack map with the field names of `Event`. The router
decodes the envelope with the payload left as raw msgpack (`WireEvent`) and then
decodes the payload into the contract registered for (type, v): typed decoding
only, never pickle, never "decode anything and look at it".
"""

from __future__ import annotations

import fnmatch
import itertools
import os
import re
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from typing import Annotated, Any, TypeVar

import msgspec

from nexus.common.text import CONTROL_RE, printable  # noqa: F401  re-exported for the wire layer
from nexus.errors import EventError
from nexus.protocol.partitions import partition_key

# C0 controls, DEL and C1 controls: they reach terminals and logs (escape sequences,
# forged lines), so `source`, `key` and `correlation_id` refuse them (SDK: _EventMaker,
# router: Intake, with caches: a msgspec Meta pattern here doubled the envelope decode).
TypeName = Annotated[str, msgspec.Meta(min_length=3, max_length=128)]
Source = Annotated[str, msgspec.Meta(min_length=1, max_length=128)]
EventId = Annotated[str, msgspec.Meta(min_length=1, max_length=64)]
Key = Annotated[str, msgspec.Meta(max_length=256)]
Priority = Annotated[int, msgspec.Meta(ge=1, le=10)]
Version = Annotated[int, msgspec.Meta(ge=1, le=1000)]
Timestamp = Annotated[float, msgspec.Meta(ge=0, le=1e11)]  # unix seconds; NaN fails too

TYPE_RE = re.compile(r"\A[a-z][a-z0-9_]*(\.[a-z0-9_]+)+\Z")
MAX_PAYLOAD_DECODERS = 10_000  # (type, v) pairs whose payload decoder is cached


class Event(msgspec.Struct, frozen=True, omit_defaults=True):
    """One fact that happened. `payload` is the typed contract instance once decoded."""

    type: TypeName
    source: Source
    payload: Any
    id: EventId
    time: Timestamp
    key: Key | None = None
    priority: Priority = 5
    correlation_id: EventId | None = None
    v: Version = 1

    @property
    def partition_key(self) -> str:
        return partition_key(self.key, self.source)


class WireEvent(msgspec.Struct, frozen=True, omit_defaults=True, forbid_unknown_fields=True):
    """The same envelope with the payload kept as raw msgpack bytes (router side)."""

    type: TypeName
    source: Source
    payload: msgspec.Raw
    id: EventId
    time: Timestamp
    key: Key | None = None
    priority: Priority = 5
    correlation_id: EventId | None = None
    v: Version = 1


# Everything msgspec can raise on hostile bytes: invalid UTF-8 and deep nesting too.
DECODE_ERRORS = (msgspec.DecodeError, msgspec.ValidationError, UnicodeDecodeError, RecursionError)

_encoder = msgspec.msgpack.Encoder()
wire_decoder = msgspec.msgpack.Decoder(WireEvent)


def encode(obj: Any) -> bytes:
    return _encoder.encode(obj)


def decode_wire_event(data: bytes) -> WireEvent:
    return wire_decoder.decode(data)


def tail_record(seq: int, ev: WireEvent, payload: Any) -> dict[str, Any]:
    """A journaled event as `nexus tail --json` prints it and the dashboard's tail shows it."""
    return {
        "seq": seq,
        "id": ev.id,
        "type": ev.type,
        "source": ev.source,
        "key": ev.key,
        "time": ev.time,
        "payload": payload,
    }


# -- ids --------------------------------------------------------------------
# UUIDv7 (RFC 9562): 48-bit unix ms | version 7 | rand_a (12 bits) | variant 0b10 | rand_b (62).
# RFC 9562 section 6.2 method 1, "fixed bit-length dedicated counter": the low 16 bits of
# rand_b count the ids of one millisecond and the 58 bits above them are random. The random
# bits and the first 32 characters are made once per millisecond (a "block"), so an id costs
# a counter step and four hex digits instead of os.urandom and a full format. Two processes
# collide only if they draw the same 58 random bits in the same millisecond.
_COUNTER_MAX = 0xFFFF
_id_lock = threading.Lock()
# (ms, the id's first 32 characters, counter); the counter is an itertools.count, whose
# next() is atomic under the GIL, so the fast path needs no lock
_id_block: tuple[int, str, Iterator[int]] = (0, "", itertools.count(_COUNTER_MAX + 1))


def new_id() -> str:
    """A UUIDv7 string. Ids made in one process are unique and sort (as strings, and as
    UUIDs) in creation order, also within a millisecond and when the clock steps back."""
    ms = time.time_ns() // 1_000_000
    ms_block, prefix, counter = _id_block
    if ms <= ms_block:
        n = next(counter)
        if n <= _COUNTER_MAX:
            return prefix + f"{n:04x}"
    return _new_id_block(ms)


def _new_id_block(ms: int) -> str:
    """Start the block of millisecond `ms` (later if the clock stepped back or the counter
    ran out) and return its first id."""
    global _id_block
    with _id_lock:
        ms_block, prefix, counter = _id_block
        if ms <= ms_block:
            # another thread started a newer block meanwhile, or this one is used up
            n = next(counter)
            if n <= _COUNTER_MAX:
                return prefix + f"{n:04x}"
            ms = ms_block + 1  # used up: borrow the next millisecond (RFC 9562 6.2)
        rand = int.from_bytes(os.urandom(8), "big")
        value = (
            (ms << 80)
            | (0x7 << 76)
            | ((rand >> 52) << 64)  # rand_a: 12 bits
            | (0b10 << 62)
            | ((rand & (2**46 - 1)) << 16)
        )  # rand_b: 46 + counter
        h = f"{value:032x}"
        prefix = f"{h[:8]}-{h[8:12]}-{h[12:16]}-{h[16:20]}-{h[20:28]}"
        _id_block = (ms, prefix, itertools.count(1))
        return prefix + "0000"


def _new_id_after_fork() -> None:
    # a forked child must not continue its parent's block (same random bits, same counter):
    # mark it used up, so the child draws its own (and its ids still sort after the parent's)
    global _id_lock, _id_block
    _id_lock = threading.Lock()
    _id_block = (_id_block[0], "", itertools.count(_COUNTER_MAX + 1))


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_new_id_after_fork)


# -- contracts --------------------------------------------------------------
class Contract(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """Base class for payload contracts: strict, immutable."""


C = TypeVar("C", bound=type)
_REGISTRY: dict[tuple[str, int], type] = {}


def contract(type_: str, v: int = 1) -> Callable[[C], C]:
    """Register a `msgspec.Struct` as the payload contract of `type_` at version `v`."""
    if not TYPE_RE.match(type_):
        raise ValueError(f"event type {type_!r} must be dotted lowercase, e.g. 'file.created'")

    def register(cls: C) -> C:
        if not (isinstance(cls, type) and issubclass(cls, msgspec.Struct)):
            raise TypeError(f"contract for {type_} must be a msgspec.Struct")
        if not cls.__struct_config__.forbid_unknown_fields:
            raise TypeError(f"contract {cls.__name__} must set forbid_unknown_fields=True")
        existing = _REGISTRY.get((type_, v))
        same = existing is not None and (existing.__module__, existing.__qualname__) == (
            cls.__module__,
            cls.__qualname__,
        )
        if existing is not None and existing is not cls and not same:
            raise ValueError(f"{type_} v{v} already has contract {existing.__qualname__}")
        _REGISTRY[(type_, v)] = cls
        return cls

    return register


def load_contract_modules(modules: Iterable[str]) -> None:
    from nexus.common.modules import import_user_module

    for name in modules:
        import_user_module(name, "contracts")


class Contracts:
    """The contracts a process knows, with cached typed decoders."""

    def __init__(self, untyped: Iterable[str] = ()):
        self._untyped = tuple(untyped)
        # (type, v) -> its payload decoder (see payload_decoder): a reader per event looks
        # here first, one dict lookup, and calls payload_decoder on a miss
        self.payload_decoders: dict[tuple[str, int], Callable[[bytes], Any]] = {}
        self._untyped_cache: dict[str, bool] = {}

    @classmethod
    def from_modules(cls, modules: Iterable[str], untyped: Iterable[str] = ()) -> Contracts:
        load_contract_modules(modules)
        return cls(untyped)

    def struct_for(self, type_: str, v: int) -> type | None:
        return _REGISTRY.get((type_, v))

    def known_types(self) -> list[tuple[str, int]]:
        return sorted(_REGISTRY)

    def is_untyped_allowed(self, type_: str) -> bool:
        allowed = self._untyped_cache.get(type_)
        if allowed is None:
            allowed = bool(TYPE_RE.match(type_)) and any(fnmatch.fnmatchcase(type_, p) for p in self._untyped)
            if len(self._untyped_cache) < 10_000:
                self._untyped_cache[type_] = allowed
        return allowed

    def payload_decoder(self, type_: str, v: int) -> Callable[[bytes], Any]:
        """The payload decoder of (type, v), cached in `payload_decoders`: the contract's
        typed decoder, generic msgpack for an allowed untyped type, else one that raises the
        EventError. It lets msgspec's errors (DECODE_ERRORS) out as they are; decode_payload
        turns them into an EventError with the reason."""
        cls = _REGISTRY.get((type_, v))
        decode: Callable[[bytes], Any]
        if cls is not None:
            decode = msgspec.msgpack.Decoder(cls).decode
        elif self.is_untyped_allowed(type_):
            decode = msgspec.msgpack.decode
        else:
            reason = self._unknown_reason(type_, v)

            def decode(raw: bytes) -> Any:
                raise EventError(reason)

        if len(self.payload_decoders) < MAX_PAYLOAD_DECODERS:
            self.payload_decoders[(type_, v)] = decode
        return decode

    def decode_payload(self, type_: str, v: int, raw: bytes) -> Any:
        """Decode raw msgpack into the contract; raise EventError with the reason."""
        decode = self.payload_decoders.get((type_, v)) or self.payload_decoder(type_, v)
        try:
            return decode(raw)
        except msgspec.ValidationError as exc:
            raise EventError(f"payload does not match contract {type_} v{v}: {exc}") from None
        except (msgspec.DecodeError, UnicodeDecodeError, RecursionError) as exc:
            raise EventError(f"payload of {type_} is not valid msgpack: {exc}") from None

    def check_payload(self, type_: str, v: int, raw: bytes) -> None:
        """Router-side validation: the same as decode_payload, but untyped payloads stay raw."""
        if (type_, v) not in _REGISTRY:
            if self.is_untyped_allowed(type_):
                return
            raise EventError(self._unknown_reason(type_, v))
        self.decode_payload(type_, v, raw)

    def convert(self, type_: str, v: int, payload: Any) -> Any:
        """Validate a Python payload (dict or contract instance) for sending."""
        cls = _REGISTRY.get((type_, v))
        if cls is None:
            if self.is_untyped_allowed(type_):
                return payload
            raise EventError(self._unknown_reason(type_, v))
        if isinstance(payload, cls):
            return payload
        try:
            return msgspec.convert(payload, cls)
        except msgspec.ValidationError as exc:
            raise EventError(f"payload does not match contract {type_} v{v}: {exc}") from None

    def _unknown_reason(self, type_: str, v: int) -> str:
        if not TYPE_RE.match(type_):
            return f"event type {type_!r} is not dotted lowercase"
        versions = sorted(ver for (t, ver) in _REGISTRY if t == type_)
        if versions:
            return f"event type {type_} has no contract v{v} (known: {versions})"
        return f"unknown event type {type_} (no contract registered; allow it under contracts_untyped)"
