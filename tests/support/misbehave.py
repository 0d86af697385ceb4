"""Misbehaving handlers for the member fault tests (tests/system/test_faults_member.py).
Each records normal events like recorder.record and misbehaves on a payload with
"poison": true (or on every event: leak)."""

from __future__ import annotations

import asyncio
import os
import signal
import threading

from recorder import _record

_leak: list[bytes] = []


def _poison(event) -> bool:
    return isinstance(event.payload, dict) and bool(event.payload.get("poison"))


def exits(event, ctx) -> None:
    """os._exit()s on the poison event (a native library calling exit, an OOM kill)."""
    if _poison(event):
        os._exit(13)
    _record(event, ctx, ctx.options["out"])


def segfaults(event, ctx) -> None:
    """Kills itself with SIGSEGV on the poison event (a crash in a native library)."""
    if _poison(event):
        os.kill(os.getpid(), signal.SIGSEGV)
    _record(event, ctx, ctx.options["out"])


def blocks(event, ctx) -> None:
    """Blocks forever on the poison event (a call without a timeout)."""
    if _poison(event):
        threading.Event().wait()
    _record(event, ctx, ctx.options["out"])


async def blocks_async(event, ctx) -> None:
    if _poison(event):
        await asyncio.Event().wait()
    _record(event, ctx, ctx.options["out"])


def leaks(event, ctx) -> None:
    """Keeps options.leak_bytes per event forever."""
    _leak.append(os.urandom(int(ctx.options.get("leak_bytes", 65536))))
    _record(event, ctx, ctx.options["out"])


def forwards(event, ctx) -> None:
    """Emits a follow-up per event; for the poison one a follow-up the router NACKs
    (an event type without a contract)."""
    if _poison(event):
        ctx.emit("nope.unknown", {"of": event.id})
    else:
        ctx.emit("test.follow", {"of": event.id}, key=event.key)
    _record(event, ctx, ctx.options["out"])


async def exits_async(event, ctx) -> None:
    """Async: takes options.slow seconds on every event (so several are in flight at once)
    and os._exit()s 0.3 s into the poison event, while the others are still running."""
    await asyncio.sleep(0.3 if _poison(event) else float(ctx.options.get("slow", 0.05)))
    if _poison(event):
        os._exit(13)
    _record(event, ctx, ctx.options["out"])
