"""Print each event as one readable line: the demo handler."""
from __future__ import annotations

import sys
import time

import msgspec

from nexus import Context, Event

MAX_PAYLOAD_CHARS = 160


def _summary(payload: object) -> str:
    text = msgspec.json.encode(msgspec.to_builtins(payload)).decode()
    return text if len(text) <= MAX_PAYLOAD_CHARS else text[: MAX_PAYLOAD_CHARS - 1] + "…"


def handle(event: Event, ctx: Context) -> None:
    clock = time.strftime("%H:%M:%S", time.localtime(event.time)) + f".{int(event.time * 1000) % 1000:03d}"
    flags = " (redelivered)" if ctx.redelivered else ""
    line = f"{clock} {event.type} from {event.source} [{ctx.member} p{ctx.partition} #{ctx.seq}]{flags} {_summary(event.payload)}"
    print(line, file=sys.stdout, flush=True)
