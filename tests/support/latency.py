"""Latency probe handler, importable by spawned members (tests/support is on PYTHONPATH).

    handler: latency:record
    options: {out: DIR}

Takes the wall clock (time.time(), comparable across processes on one machine) as
the first thing the handler does, then appends one JSON line per handled event to
DIR/latency-MEMBER.jsonl: {"t", "id", "type", "source", "member", "redelivered",
"payload"}. Each line is one O_APPEND write, so lines from concurrent members never
interleave.
"""

from __future__ import annotations

import json
import os
import time

import msgspec


def record(event, ctx) -> None:
    t = time.time()
    line = (
        json.dumps(
            {
                "t": t,
                "id": event.id,
                "type": event.type,
                "source": event.source,
                "member": ctx.member,
                "redelivered": bool(ctx.redelivered),
                "payload": msgspec.to_builtins(event.payload),
            }
        )
        + "\n"
    )
    path = os.path.join(ctx.options["out"], f"latency-{ctx.member}.jsonl")
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        os.write(fd, line.encode())
    finally:
        os.close(fd)


def read(out: str) -> list[dict]:
    """Every complete record written so far (a line still being written is skipped)."""
    rows: list[dict] = []
    for name in sorted(os.listdir(out)):
        if not name.startswith("latency-"):
            continue
        with open(os.path.join(out, name)) as f:
            for line in f:
                if line.endswith("\n"):
                    try:
                        rows.append(json.loads(line))
                    except json.JSONDecodeError:
                        pass
    return rows
