"""What a member accepts from its partition's subjects (pure): any NATS client may publish
there, so the router's validation happens here, before a handler sees the event."""

from __future__ import annotations

import fnmatch
from typing import NamedTuple

from nexus.errors import EventError
from nexus.protocol.events import DECODE_ERRORS, Contracts, WireEvent, decode_wire_event


class Rejected(NamedTuple):
    reason: str


class Intake:
    def __init__(self, contracts: Contracts, subscribe: list[str]):
        self.contracts = contracts
        self.subscribe = tuple(subscribe)
        self._wanted: dict[str, bool] = {}  # type -> subscribed (cached)

    def wants(self, type_: str) -> bool:
        wanted = self._wanted.get(type_)
        if wanted is None:
            wanted = any(fnmatch.fnmatchcase(type_, p) for p in self.subscribe)
            if len(self._wanted) < 10_000:
                self._wanted[type_] = wanted
        return wanted

    def check(self, data: bytes) -> WireEvent | Rejected | None:
        """The event to handle; Rejected (with why) for bytes that are not an event or a
        payload that breaks its contract; None for an event of a type the group does not
        subscribe to (passed over, acked)."""
        try:
            w = decode_wire_event(data)
        except DECODE_ERRORS as exc:
            return Rejected(f"not a Nexus event: {exc}")
        if not self.wants(w.type):
            return None
        try:
            self.contracts.check_payload(w.type, w.v, w.payload)
        except EventError as exc:
            return Rejected(str(exc))
        return w
