"""Print each event as one readable line: the demo handler."""

from __future__ import annotations

import sys
import time

import msgspec

from nexus import Context, Event
from nexus.protocol.events import printable

MAX_PAYLOAD_CHARS = 240
MAX_FIELD_CHARS = 80  # one long field (a snippet, a body) must not hide the others


def _short(value: object) -> object:
    if isinstance(value, str) and len(value) > MAX_FIELD_CHARS:
        # keep both ends: the start of a subject, the file name at the end of a path
        half = MAX_FIELD_CHARS // 2
        return value[: half - 1] + "…" + value[-half:]
    if isinstance(value, dict):
        return {k: _short(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_short(v) for v in value[:5]] + (["…"] if len(value) > 5 else [])
    return value


def _summary(payload: object) -> str:
    text = msgspec.json.encode(_short(msgspec.to_builtins(payload))).decode()
    return text if len(text) <= MAX_PAYLOAD_CHARS else text[: MAX_PAYLOAD_CHARS - 1] + "…"


def handle(event: Event, ctx: Context) -> None:
    clock = time.strftime("%H:%M:%S", time.localtime(event.time)) + f".{int(event.time * 1000) % 1000:03d}"
    flags = " (redelivered)" if ctx.redelivered else ""
    where = f"[{ctx.member} p{ctx.partition} #{ctx.seq}]{flags}"
    line = f"{clock} {event.type} from {event.source} {where} {_summary(event.payload)}"
    # source, key and payload strings come from producers: escape control characters
    # (terminal escape sequences, forged lines) instead of printing them
    print(printable(line), file=sys.stdout, flush=True)
