"""Shared helpers of the built-in sinks: strict options, event data, and templates.

Template syntax (one syntax for typed and untyped payloads): str.format-style
fields whose names are dotted paths into plain data, e.g.
``"{payload.subject}"``, ``"From {payload.from}"``, ``"{event.source}"``,
``"{payload.to.0}"`` (list index), with an optional ``!r`` conversion and format
spec (``"{event.priority:02d}"``). Roots: ``payload`` (the payload as
`msgspec.to_builtins` gives it, so contract field names are their wire names:
``from``, not ``from_``) and ``event`` (the envelope fields). ``{{`` and ``}}``
are literal braces.

Rules: a null value renders as ""; a path that does not exist is an error
(`TemplateError`), so a typo does not silently send empty notifications. Syntax
errors are found when the sink is built (`ConfigError`), not per event.
"""

from __future__ import annotations

import fnmatch
import string
from collections.abc import Iterable
from typing import Any, Generic, TypeVar

import msgspec

from nexus.errors import ConfigError, PermanentError
from nexus.protocol.events import Event

T = TypeVar("T")
ROOTS = ("payload", "event")
_MISSING = object()


class TemplateError(PermanentError):
    """A template could not be rendered for one event (missing field, bad format spec):
    retrying cannot help, so the event goes straight to the dead-letter store."""


def load_options(cls: type[T], options: dict | None, sink: str) -> T:
    """Decode a group's `options` into a strict Struct; a typo is an error naming the key."""
    try:
        return msgspec.convert(options or {}, cls)
    except msgspec.ValidationError as exc:
        raise ConfigError(f"{sink} options: {exc}") from None


def event_data(event: Event) -> dict[str, Any]:
    """The template namespace: every envelope field (defaults included) and the payload."""
    payload = msgspec.to_builtins(event.payload)
    env = {f: getattr(event, f) for f in event.__struct_fields__}
    env["payload"] = payload
    return {"payload": payload, "event": env}


class Template:
    """A compiled template; `render(data)` fills it from `event_data(...)`."""

    __slots__ = ("source", "_parts")

    def __init__(self, source: str, where: str = "template"):
        self.source = source
        self._parts: list[tuple[str, tuple[str, ...] | None, str | None, str]] = []
        try:
            parsed = list(string.Formatter().parse(source))
        except ValueError as exc:
            raise ConfigError(f"{where} {source!r}: {exc}") from None
        for literal, field, spec, conversion in parsed:
            if field is None:
                self._parts.append((literal, None, None, ""))
                continue
            if "[" in field:
                raise ConfigError(f"{where} {source!r}: use dotted paths, e.g. {{payload.from}}, not {{{field}}}")
            path = tuple(field.split("."))
            if path[0] not in ROOTS or not all(path):
                raise ConfigError(
                    f"{where} {source!r}: field {{{field}}} must be a dotted path "
                    f"starting with one of {', '.join(ROOTS)}"
                )
            if conversion not in (None, "s", "r", "a"):
                raise ConfigError(f"{where} {source!r}: unknown conversion !{conversion}")
            if spec and "{" in spec:
                raise ConfigError(f"{where} {source!r}: nested fields in format specs are not supported")
            self._parts.append((literal, path, conversion, spec or ""))

    def render(self, data: dict[str, Any]) -> str:
        out: list[str] = []
        for literal, path, conversion, spec in self._parts:
            out.append(literal)
            if path is None:
                continue
            value = _resolve(data, path)
            if value is _MISSING:
                raise TemplateError(f"template {self.source!r}: {'.'.join(path)} not found{_known_keys(data, path)}")
            if value is None:
                continue
            if conversion:
                value = {"s": str, "r": repr, "a": ascii}[conversion](value)
            try:
                out.append(format(value, spec))
            except (ValueError, TypeError) as exc:
                raise TemplateError(f"template {self.source!r}: {'.'.join(path)}: {exc}") from None
        return "".join(out)


def value_at(data: dict[str, Any], path: tuple[str, ...]) -> Any:
    """The value at a dotted path of `event_data(...)` as it is (not rendered to text);
    TemplateError when it does not exist, as for a template field."""
    value = _resolve(data, path)
    if value is _MISSING:
        raise TemplateError(f"{'.'.join(path)} not found{_known_keys(data, path)}")
    return value


def _resolve(data: Any, path: Iterable[str]) -> Any:
    cur = data
    for seg in path:
        if isinstance(cur, dict):
            if seg in cur:
                cur = cur[seg]
            elif seg.endswith("_") and seg[:-1] in cur:
                cur = cur[seg[:-1]]  # Python spelling of a renamed field: from_ -> from
            else:
                return _MISSING
        elif isinstance(cur, list) and seg.isdigit():
            idx = int(seg)
            if idx >= len(cur):
                return _MISSING
            cur = cur[idx]
        else:
            return _MISSING
    return cur


def _known_keys(data: Any, path: tuple[str, ...]) -> str:
    """A hint for the error message: the keys that do exist where the path broke off."""
    cur = data
    for seg in path[:-1]:
        nxt = _resolve(cur, (seg,))
        if nxt is _MISSING:
            break
        cur = nxt
    if isinstance(cur, dict) and cur:
        keys = ", ".join(sorted(map(str, cur))[:20])
        return f" (available: {keys})"
    return ""


class Rules(Generic[T]):
    """Event-type globs to rules, first match wins (dict order = config order), cached."""

    def __init__(self, rules: Iterable[tuple[str, T]]):
        self._rules = list(rules)
        self._cache: dict[str, T | None] = {}

    def match(self, type_: str) -> T | None:
        try:
            return self._cache[type_]
        except KeyError:
            pass
        rule = next((r for glob, r in self._rules if fnmatch.fnmatchcase(type_, glob)), None)
        if len(self._cache) < 10_000:  # types are bounded in practice; stay bounded anyway
            self._cache[type_] = rule
        return rule
