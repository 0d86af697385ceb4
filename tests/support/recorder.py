"""Test handlers, importable by spawned members (tests/support is on PYTHONPATH)."""

from __future__ import annotations

import os
import time

_failures: dict[str, int] = {}


def _record(event, ctx, out: str) -> None:
    line = f"{ctx.member} {event.id} {ctx.seq} {ctx.partition} {int(ctx.redelivered)} {ctx.attempt}"
    tag = ctx.options.get("tag")
    line += f" {tag}\n" if tag else "\n"  # the config the member runs (a reload changes it)
    fd = os.open(os.path.join(out, f"handled-{ctx.member}.log"), os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        os.write(fd, line.encode())
    finally:
        os.close(fd)


def record(event, ctx) -> None:
    """Append one line per handled event; options: out (dir), sleep (s), fail_first (n),
    tag (written on each line), debug (also log a debug line per event)."""
    opts = ctx.options
    if opts.get("debug"):
        ctx.log.debug("recorder_debug_line", event_id=event.id)
    fail_first = int(opts.get("fail_first", 0))
    if fail_first and _failures.get(event.id, 0) < fail_first:
        _failures[event.id] = _failures.get(event.id, 0) + 1
        raise RuntimeError(f"planned failure {_failures[event.id]} of {fail_first}")
    if opts.get("sleep"):
        time.sleep(float(opts["sleep"]))
    _record(event, ctx, opts["out"])


async def record_async(event, ctx) -> None:
    import asyncio

    if ctx.options.get("sleep"):
        await asyncio.sleep(float(ctx.options["sleep"]))
    _record(event, ctx, ctx.options["out"])


def read_handled(out: str) -> list[tuple[str, str, int, int, int, int]]:
    rows = []
    for name in sorted(os.listdir(out)):
        if name.startswith("handled-"):
            with open(os.path.join(out, name)) as f:
                for line in f:
                    parts = line.split()[:6]  # (a 7th: the tag, see read_tags)
                    if len(parts) == 6:
                        rows.append((parts[0], parts[1], int(parts[2]), int(parts[3]), int(parts[4]), int(parts[5])))
    return rows


def tally(rows) -> tuple[set[str], int, int]:
    """(ids handled, flagged, unflagged) over read_handled rows: of an id handled n
    times, n-1 handlings must carry ctx.redelivered; those beyond the flags are unflagged."""
    by_id: dict[str, list[int]] = {}
    for _member, event_id, _seq, _p, redelivered, _attempt in rows:
        by_id.setdefault(event_id, []).append(redelivered)
    flagged = unflagged = 0
    for flags in by_id.values():
        extra = len(flags) - 1
        if extra > 0:
            ok = min(extra, sum(flags))
            flagged, unflagged = flagged + ok, unflagged + extra - ok
    return set(by_id), flagged, unflagged


def read_tags(out: str) -> list[tuple[str, str, str]]:
    """(member, event id, tag) of every line that has a tag."""
    rows = []
    for name in sorted(os.listdir(out)):
        if name.startswith("handled-"):
            with open(os.path.join(out, name)) as f:
                rows += [(p[0], p[1], p[6]) for p in (line.split() for line in f) if len(p) == 7]
    return rows


def poisonable(event, ctx) -> None:
    """Fails every attempt for payloads with "poison": true until the file
    options.fixed exists (the "fix" a test deploys); records the rest."""
    payload = event.payload
    if isinstance(payload, dict) and payload.get("poison") and not os.path.exists(ctx.options["fixed"]):
        raise ValueError(f"cannot digest event {event.id}")
    _record(event, ctx, ctx.options["out"])


_count = 0


def recycling(event, ctx) -> None:
    """Records; after options.every events the member stops gracefully (drain, ack,
    leave) and its process ends with exit code 8 (RECYCLE): a stand-in for a member
    recycling itself on max_events."""
    global _count
    _record(event, ctx, ctx.options["out"])
    _count += 1
    if _count == int(ctx.options["every"]):
        import atexit
        import signal

        atexit.register(os._exit, 8)  # after the graceful stop, exit with RECYCLE
        os.kill(os.getpid(), signal.SIGTERM)


def gated(event, ctx) -> None:
    """Records each event once the file options.gate exists: until a test creates it the
    group's lag grows with every event sent (gives up after options.wait s, default 60)."""
    deadline = time.monotonic() + float(ctx.options.get("wait", 60))
    while not os.path.exists(ctx.options["gate"]) and time.monotonic() < deadline:
        time.sleep(0.02)
    _record(event, ctx, ctx.options["out"])


class Configured:
    """A class handler, made with the group's options: records; with options.refuse it
    refuses to start (a ConfigError: the member exits 3), as a handler missing a setting
    would. It imports fine, so only starting a member finds the problem."""

    def __init__(self, options: dict):
        if options.get("refuse"):
            from nexus.errors import ConfigError

            raise ConfigError(f"Configured: {options['refuse']}")
        self.out = options["out"]

    def handle(self, event, ctx) -> None:
        _record(event, ctx, self.out)
