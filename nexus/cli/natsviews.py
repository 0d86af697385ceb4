"""The CLI's views under `engine: nats`: the ingest's counters and the stream's facts in
`nexus status`, `nexus journal info` (the stream and each group's consumers), and
`nexus tail` read from the events stream (there is no router publishing a tail)."""

from __future__ import annotations

import asyncio
import json
import sys
import time
from collections.abc import Callable
from typing import Any

from nexus.config import Config
from nexus.errors import ExitCode

TAIL_POLL = 0.2  # seconds one wait for the next event lasts (then --seconds is checked)


def engine_line(e: dict[str, Any]) -> str:
    if not e.get("reachable"):
        return f"engine nats: stream {e.get('stream')}: cluster unreachable ({e.get('error')})"
    followers = ", ".join(
        f"{r['name']}{'' if r['current'] else ' (behind ' + str(r['lag']) + ')'}{' OFFLINE' if r['offline'] else ''}"
        for r in e.get("replicas", [])
    )
    return (
        f"engine nats: stream {e['stream']} leader={e.get('leader') or 'NONE'}"
        + (f" followers: {followers}" if followers else "")
        + f"; {e['messages']} events, {e['bytes']} bytes, seq {e['first_seq']}..{e['last_seq']}"
        + (f", cluster {e['cluster']}" if e.get("cluster") else "")
    )


def print_status(status: dict[str, Any]) -> None:
    r = status.get("router", {})
    reasons = ", ".join(f"{k}={v}" for k, v in sorted(r.get("rejected_by_reason", {}).items())) or "none"
    print(
        f"ingest: accepted={r.get('accepted', 0)} rejected={r.get('rejected', 0)} ({reasons}) "
        f"duplicates={r.get('duplicates', 0)}"
        + (f" rejected_kept={status['engine']['rejected_kept']}" if "rejected_kept" in status["engine"] else "")
    )
    print(engine_line(status["engine"]))


def journal_info(status: dict[str, Any], as_json: bool) -> int:
    info = {
        "engine": status["engine"],
        "groups": {
            name: {k: g.get(k) for k in ("lag", "partition_lag", "owners", "dead_letters")}
            for name, g in status["groups"].items()
        },
    }
    if as_json:
        print(json.dumps(info, indent=2, default=str))
        return ExitCode.OK
    print(engine_line(info["engine"]))
    for name, g in info["groups"].items():
        print(f"  group {name}: lag={g['lag']} dead_letters={g['dead_letters']}")
        for p, (lag, owner) in enumerate(zip(g["partition_lag"] or [], g["owners"] or [], strict=False)):
            print(f"    partition {p}: lag={lag} owner={owner or '-'}")
    return ExitCode.OK


def tail(cfg: Config, args, show: Callable[[int, bytes, Any], bool]) -> int:
    """Events stored from now on (every shard, not a group's replays), printed by `show`."""
    try:
        # (--seconds bounds the wait for a cluster too, as the embedded tail's for a pipeline)
        asyncio.run(asyncio.wait_for(_tail(cfg, args, show), args.seconds or None))
    except (TimeoutError, KeyboardInterrupt):
        pass
    return ExitCode.OK


async def _tail(cfg: Config, args, show: Callable[[int, bytes, Any], bool]) -> None:
    from nats.errors import TimeoutError as NatsTimeout
    from nats.js import api

    from nexus.jetstream import connect
    from nexus.jetstream.names import Names

    names = Names.of(cfg)
    waiting: list[str] = []

    async def unreachable(exc: Exception) -> None:  # nats-py retries; the operator hears why once
        if not waiting:
            waiting.append(repr(exc))
            where = ", ".join(cfg.nats.servers)
            print(
                f"nexus tail: waiting for the cluster at {where} ({exc}); Ctrl-C to stop", file=sys.stderr, flush=True
            )

    nc = await connect.connect(cfg, "nexus-tail", error_cb=unreachable)
    try:
        js = nc.jetstream()
        sub = await js.subscribe(
            f"{names.prefix}.ev.*", ordered_consumer=True, deliver_policy=api.DeliverPolicy.NEW, stream=names.stream
        )
        shown = 0
        deadline = time.monotonic() + args.seconds if args.seconds else None
        while args.count == 0 or shown < args.count:
            if deadline is not None and time.monotonic() >= deadline:
                break
            try:
                msg = await sub.next_msg(timeout=TAIL_POLL)
            except (TimeoutError, NatsTimeout):
                continue
            if show(msg.metadata.sequence.stream, msg.data, args):
                shown += 1
    finally:
        await nc.close()
