"""A group's handler: loading it from its 'module:attr' spec, and what a call gets (the
Event with its payload decoded per its contract, and the Context)."""

from __future__ import annotations

import inspect
from collections.abc import Callable
from typing import Any, cast

from nexus.common.modules import import_user_module
from nexus.errors import ConfigError
from nexus.member.context import Context
from nexus.member.stream import PartitionStream
from nexus.protocol.events import DECODE_ERRORS, Contracts, Event, WireEvent


def find_handler(spec: str) -> Any:
    """'module:attr' -> the function or class it names; ConfigError (one line) when the
    module does not import or has no such callable. Also what a reload checks, in a
    short-lived process, before members start on a changed handler (supervisor/importcheck.py)."""
    module_name, _, attr = spec.partition(":")
    module = import_user_module(module_name, f"handler {spec}")
    target: Any = getattr(module, attr, None)
    if target is None:
        raise ConfigError(f"handler {spec}: {module_name} has no attribute {attr!r}")
    if not callable(target):
        raise ConfigError(f"handler {spec}: {attr} is not callable")
    return target


def load_handler(spec: str, options: dict) -> tuple[Callable, Callable | None]:
    """'module:attr' -> (handle, close). A class is instantiated with the options."""
    target = find_handler(spec)
    if inspect.isclass(target):
        instance: Any = cast(Any, target)(options)  # (mypy: isclass narrows it to type[object])
        return instance.handle, getattr(instance, "close", None)
    return target, None


class Handler:
    """`handle(event, ctx)`, sync or async, and `prepare`, which makes its arguments."""

    def __init__(
        self,
        handle: Callable,
        *,
        contracts: Contracts,
        group: str,
        member: str,
        options: dict,
        log: Any,
        emit: Callable[..., str] | None = None,
        close: Callable | None = None,
    ):
        self.handle = handle
        self.close = close
        self.is_async = inspect.iscoroutinefunction(handle)
        self.contracts = contracts
        self.decoders = contracts.payload_decoders  # (type, v) -> payload decoder, filled on a miss
        self.group, self.member = group, member
        self.options = options  # the group's `options` from config, as ctx.options
        self.log = log
        self.emit = emit
        self.redeliveries = 0  # calls handed ctx.redelivered (a metric)

    def prepare(self, st: PartitionStream, seq: int, w: WireEvent) -> tuple[Event, Context]:
        """The Event and Context of a call on `st`'s event `seq`. A payload that does not
        decode raises the EventError with its reason (the call fails with it)."""
        try:
            decode = self.decoders.get((w.type, w.v)) or self.contracts.payload_decoder(w.type, w.v)
            payload = decode(w.payload)
        except DECODE_ERRORS:
            # the same decode again, for the EventError with its reason (handled as a failure)
            payload = self.contracts.decode_payload(w.type, w.v, w.payload)
        event = Event(w.type, w.source, payload, w.id, w.time, w.key, w.priority, w.correlation_id, w.v)
        redelivered = st.attempt > 1 or seq <= st.redelivered_upto
        if redelivered:
            self.redeliveries += 1
        ctx = Context(
            self.group,
            self.member,
            st.attempt,
            redelivered,
            seq,
            st.partition,
            self.options,
            self.log,
            self.emit,
            w.id,
            w.correlation_id,
        )
        return event, ctx
