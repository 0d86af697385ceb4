"""The `nexus` command: send, status, scale, worker, tail, journal, dlq, reload, dashboard, keys, tokens."""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
import time
from datetime import UTC
from typing import Any

import msgspec
import zmq

from nexus import config as config_mod
from nexus.cli import keys, progress, tokens
from nexus.errors import ConfigError, EventError, ExitCode, NexusError, PeerError
from nexus.protocol import transport
from nexus.protocol.client import REQUEST_TIMEOUT, ControlClient, CoordClient, require_listening
from nexus.protocol.curve import client_keys
from nexus.protocol.events import Contracts, decode_wire_event, printable, tail_record
from nexus.protocol.wire import TAIL_TOPIC, ControlReply, delivery_decoder
from nexus.supervisor.reloadplan import DROPPED

START_HINT = "; start the pipeline with `python -m nexus.launch -c FILE`"
# seconds: above the launcher's handler import check (importcheck.TIMEOUT) plus its wait
# for the router (reloader.FIRST_PUSH_TIMEOUT)
RELOAD_TIMEOUT = 60.0


def _load(args) -> config_mod.Config:
    cfg = config_mod.load(args.config, args.env)
    config_mod.add_module_paths(cfg)
    return cfg


# Both clients fail at once, with START_HINT, when nothing can be listening (no pipeline
# runs), and after REQUEST_TIMEOUT when a peer is there but does not answer.
def _router(cfg: config_mod.Config) -> CoordClient:
    return CoordClient(cfg.coord, REQUEST_TIMEOUT, probe=True, not_running_hint=START_HINT, curve=client_keys(cfg))


def _launcher(cfg: config_mod.Config) -> ControlClient:
    return ControlClient(
        cfg.control_endpoint, REQUEST_TIMEOUT, probe=True, not_running_hint=START_HINT, curve=client_keys(cfg)
    )


def _done(reply: ControlReply) -> ControlReply:
    """The launcher's reply when it did what was asked; its reason otherwise."""
    if not reply.get("ok"):
        raise NexusError(reply.get("error", "launcher refused the request"))
    return reply


def _print_json(data: Any) -> None:
    print(json.dumps(data, indent=2, sort_keys=True, default=str))


# -- send -----------------------------------------------------------------------------
def cmd_send(args) -> int:
    from nexus.producer.client import Producer

    cfg = _load(args)
    Contracts.from_modules(cfg.contracts, cfg.contracts_untyped)
    if args.payload == "-":
        lines = [line for line in sys.stdin.read().splitlines() if line.strip()]
    else:
        lines = [args.payload]
    payloads = []
    for n, line in enumerate(lines, 1):
        try:
            payloads.append(json.loads(line))
        except json.JSONDecodeError as exc:
            where = f" (line {n} of stdin)" if args.payload == "-" else ""
            raise EventError(f"--payload is not valid JSON{where}: {exc.msg} at column {exc.colno}") from None
    endpoint = cfg.ingest if args.fire else cfg.confirm
    with Producer(
        endpoint,
        source=args.source,
        confirm=not args.fire,
        max_event_bytes=cfg.router.max_event_bytes,
        curve=client_keys(cfg),
    ) as producer:
        ids = [producer.send(args.type, p, key=args.key, priority=args.priority, v=args.v) for p in payloads]
        try:
            require_listening(endpoint, "router", START_HINT)  # after send: an invalid event fails first
        except PeerError:
            with contextlib.suppress(NexusError):
                producer.close(0)  # nobody to wait for
            raise
        producer.flush(args.timeout)
    for event_id in ids:
        print(event_id)
    return ExitCode.OK


# -- status ---------------------------------------------------------------------------
def _fmt_uptime(seconds: float) -> str:
    seconds = int(seconds)
    if seconds >= 3600:
        return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"
    if seconds >= 60:
        return f"{seconds // 60}m{seconds % 60:02d}s"
    return f"{seconds}s"


def _detail(detail: dict | None) -> str:
    """One line for a producer: events emitted, and mailbox states for IMAP (the embedded
    nats-server: where it listens)."""
    if not detail:
        return ""
    if "listen" in detail:
        return f"listen={detail['listen']}"
    parts = [f"emitted={detail.get('emitted', 0)}"]
    for mailbox, mb in detail.get("mailboxes", {}).items():
        parts.append(f"{mailbox}: {mb['state']}" + (f" ({mb['error']})" if mb.get("error") else ""))
    return " ".join(parts)[:160]


def _fmt_seconds(seconds: float) -> str:
    return f"{seconds:g}s" if seconds < 60 else _fmt_uptime(seconds)


def _print_autoscale(groups: dict, desired: dict) -> None:
    """The launcher's "autoscale" key: one line per autoscaled group."""
    print(
        f"{'AUTOSCALE':<16} {'MEMBERS':>7} {'DESIRED':>7} {'BOUNDS':>7} {'TARGET':>8} {'LAG/MEMBER':>10} "
        f"{'COOLDOWN':>8} {'UP':>4} {'DOWN':>4}  LAST CHANGE"
    )
    for name, a in groups.items():
        last = f"{_when(a['last_change'])} ({a['last_reason']})" if a.get("last_change") else "-"
        bounds = f"{a['min']}..{a['max']}"
        print(
            f"{name:<16} {a['members']:>7} {desired.get(name, '-')!s:>7} {bounds:>7} "
            f"{a['target_lag']:>8g} {a['lag_per_member']:>10g} {_fmt_seconds(a['cooldown']):>8} "
            f"{a['decisions']['up']:>4} {a['decisions']['down']:>4}  {last}"
        )
    print()


def cmd_status(args) -> int:
    cfg = _load(args)
    from concurrent.futures import ThreadPoolExecutor

    from nexus.http import health

    status: dict[str, Any] = {}
    errors = []
    answers: list[dict[str, Any] | None] = []  # the launcher's, the router's
    with ThreadPoolExecutor(2) as pool:  # both at once: a stalled pipeline costs one timeout, not two
        asks = [pool.submit(lambda: _done(_launcher(cfg).status())), pool.submit(_router(cfg).status)]
    for ask in asks:
        try:
            answer = dict(ask.result())
            answers.append(answer)
            status.update(answer)
        except PeerError as exc:
            answers.append(None)
            errors.append(str(exc))
    status.pop("ok", None)
    if not status:
        hint = START_HINT if any(e.endswith(START_HINT) for e in errors) else ""
        raise PeerError("; ".join(e.removesuffix(START_HINT) for e in errors) + hint)
    if errors:
        status["errors"] = errors
    verdict = health.verdict(*answers)  # the same as /healthz and /readyz
    status["health"] = verdict
    if args.json:
        _print_json(status)
        return ExitCode.OK
    if "processes" in status:
        print(
            f"{'PROCESS':<20} {'ROLE':<9} {'GROUP':<12} {'PID':>7} {'STATE':<9} {'RESTARTS':>8} {'UPTIME':>8}  "
            f"{'LAST EXIT':<22} DETAIL"
        )
        for p in status["processes"]:
            print(
                f"{p['name']:<20} {p['role']:<9} {p['group'] or '-':<12} {p['pid'] or '-':>7} "
                f"{p['state']:<9} {p['restarts']:>8} {_fmt_uptime(p['uptime']):>8}  "
                f"{p.get('last_exit') or '-':<22} {_detail(p.get('detail'))}"
            )
        if "reload" in status:
            print(_reload_line(status["reload"]))
        print()
    if "groups" in status:
        print(f"{'GROUP':<16} {'MEMBERS':>7} {'PARTITIONS':>10} {'UNASSIGNED':>10} {'LAG':>10} {'DEAD':>6}")
        for name, g in status["groups"].items():
            print(
                f"{name:<16} {len(g['members']):>7} {g['partitions']:>10} {g['unassigned']:>10} "
                f"{g['lag']!s:>10} {g.get('dead_letters', 0):>6}"
            )
        print()
        print(f"{'MEMBER':<24} {'GROUP':<12} {'PARTS':>5} {'HANDLED':>9} {'FAILED':>7} {'DEAD':>5} {'BREAKER':<9}")
        for name, g in status["groups"].items():
            for m in g["members"]:
                print(
                    f"{m['name']:<24} {name:<12} {len(m['partitions']):>5} {m.get('handled', '-')!s:>9} "
                    f"{m.get('failed', '-')!s:>7} {m.get('dead_lettered', '-')!s:>5} {m.get('breaker', '-'):<9}"
                )
        print()
    if status.get("autoscale"):
        _print_autoscale(status["autoscale"], status.get("scale", {}))
    if isinstance(status.get("engine"), dict):
        from nexus.cli import natsviews

        natsviews.print_status(status)
    elif "router" in status:
        r = status["router"]
        reasons = ", ".join(f"{k}={v}" for k, v in sorted(r["rejected_by_reason"].items())) or "none"
        print(
            f"router: accepted={r['accepted']} rejected={r['rejected']} ({reasons}) "
            f"duplicates={r['duplicates']} seq={r['seq']} journal={r['journal']['bytes']} bytes "
            f"in {len(r['journal']['segments'])} segment(s)"
        )
        damaged = r.get("cursor_file_damaged")
        if damaged:
            where = "its previous copy" if damaged["recovered_from"] == "previous" else "the journal start"
            print(f"cursor file damaged at start: {damaged['path']}: {damaged['error']} (groups resumed from {where})")
        if r.get("recovering"):
            print(f"router: recovering, {r['recovered_records']} journal records read so far")
        storage = r.get("storage", {})
        if storage.get("state", "ok") != "ok":
            failing = "; ".join(f"{k}: {v}" for k, v in storage.get("failing", {}).items())
            print(f"storage: ERROR since {_when(storage.get('since'))}: {failing}")
        j = r["journal"]
        if j.get("damaged_ranges"):
            print(
                f"journal: {j['damaged_ranges']} damaged range(s), {j['damaged_bytes']} bytes skipped "
                f"(nexus journal verify)"
            )
        for c in j.get("cursor_past_end", []):
            print(f"journal: group {c['group']} cursor {c['cursor']} was past the last seq {c['last_seq']} at start")
        if r.get("rate_limits"):
            limits = ", ".join(f"{k}={v['rate']:g}/s burst {v['burst']}" for k, v in r["rate_limits"].items())
            print(f"rate limits: {limits}")
        security = r.get("security", {})
        if security.get("curve"):
            refused = ", ".join(f"{k}={v}" for k, v in sorted(security["refused"].items())) or "none"
            forbidden = ", ".join(f"{k}={v}" for k, v in sorted(security["forbidden"].items())) or "none"
            print(
                f"security: curve on, {security['authorized_keys']} authorized key(s); "
                f"refused handshakes: {refused}; forbidden requests: {forbidden}"
            )
    print(health.verdict_line(verdict))
    for err in errors:
        print(f"warning: {err}", file=sys.stderr)
    return ExitCode.OK


# -- scale, worker ----------------------------------------------------------------------
def cmd_scale(args) -> int:
    cfg = _load(args)
    reply = _done(_launcher(cfg).scale(args.group, args.n))
    auto = reply.get("autoscale")
    note = (
        f" (autoscaled within [{auto['min']}, {auto['max']}]: the autoscaler goes on from "
        f"{reply['new']} after its cooldown of {_fmt_seconds(auto['cooldown'])})"
        if auto
        else ""
    )
    print(f"{reply['group']}: {reply['old']} -> {reply['new']} processes{note}")
    return ExitCode.OK


def cmd_worker(args) -> int:
    from nexus.common import logs
    from nexus.supervisor.child import member_main

    cfg = _load(args)
    worker_main = member_main(cfg)
    if args.group not in cfg.workers:
        raise ConfigError(f"unknown worker group {args.group!r} (configured: {', '.join(cfg.workers) or 'none'})")
    name = args.name or f"{args.group}-{os.uname().nodename}-{os.getpid()}"
    logs.configure(cfg.log.level, cfg.log.format, process=name)
    worker_main(cfg, args.group, name)
    return ExitCode.OK


# -- tail -------------------------------------------------------------------------------
def _show_event(seq: int, raw: bytes, args) -> bool:
    """Print one event if its type matches --pattern; False when it does not."""
    import fnmatch

    ev = decode_wire_event(raw)
    if not fnmatch.fnmatchcase(ev.type, args.pattern):
        return False
    payload = msgspec.msgpack.decode(ev.payload)
    if args.json:
        print(json.dumps(tail_record(seq, ev, payload), default=str), flush=True)
    else:
        # producer text (an old journal may hold control characters): escaped
        print(printable(f"#{seq} {ev.type} from {ev.source} {json.dumps(payload, default=str)[:200]}"), flush=True)
    return True


def cmd_tail(args) -> int:
    cfg = _load(args)
    if cfg.engine == "nats":  # no router to publish a tail: read the events stream itself
        from nexus.cli import natsviews

        return natsviews.tail(cfg, args, _show_event)
    sub = transport.subscriber(zmq.Context.instance(), cfg.publish, curve=client_keys(cfg))
    sub.setsockopt(zmq.SUBSCRIBE, TAIL_TOPIC)
    shown = 0
    deadline = time.monotonic() + args.seconds if args.seconds else None
    # ZeroMQ reconnects by itself; the probe only tells the operator why nothing shows yet
    waiting = transport.unreachable(cfg.publish)
    if waiting:
        print(
            f"nexus tail: waiting for a pipeline (nothing at {cfg.publish}: {waiting}); Ctrl-C to stop",
            file=sys.stderr,
            flush=True,
        )
    try:
        while args.count == 0 or shown < args.count:
            if deadline is not None and time.monotonic() >= deadline:
                break
            if not sub.poll(200):
                if waiting and not transport.unreachable(cfg.publish):
                    waiting = None
                    print(f"nexus tail: pipeline found at {cfg.publish}", file=sys.stderr, flush=True)
                continue
            frames = sub.recv_multipart()
            if len(frames) != 2 or frames[0] != TAIL_TOPIC:
                continue
            delivery = delivery_decoder.decode(frames[1])
            for seq, raw in zip(delivery.seqs, delivery.events, strict=False):
                if not _show_event(seq, raw, args):
                    continue
                shown += 1
                if args.count and shown >= args.count:
                    break
    except KeyboardInterrupt:
        pass
    finally:
        sub.close(0)
    return ExitCode.OK


# -- journal ------------------------------------------------------------------------------
def cmd_journal_verify(cfg: config_mod.Config, args) -> int:
    """Read the journal files directly (no router needed, safe while it runs): every
    damaged range, and group cursors past the journal's end."""
    from nexus.router.cursors import CursorStore
    from nexus.router.segments import verify

    directory = os.path.join(cfg.data_dir, "journal")
    if not os.path.isdir(directory):
        raise NexusError(f"no journal at {directory}")
    store = CursorStore(os.path.join(cfg.data_dir, "cursors.msgpack"))
    cursors = store.load(quarantine=False)  # before the scan; a live router owns the file
    with progress.track(progress.wanted(args), "verify", None, "bytes") as bar:
        result = verify(directory, on_progress=lambda done, total: bar.update(done, total))
    result["cursors_damaged"] = store.damage
    result["cursor_past_end"] = [
        {"group": g, "cursor": max(c), "last_seq": result["last_seq"]}
        for g, c in sorted(cursors.items())
        if c and max(c) > result["last_seq"]
    ]
    bad = bool(result["damaged"] or result["cursor_past_end"])
    if args.json:
        _print_json(result)
    else:
        for d in result["damaged"]:
            print(
                f"damaged: {d['segment']} offset {d['offset']}, {d['bytes']} bytes, "
                f"seq {d['first_seq']}..{d['last_seq'] or '?'}"
            )
        if store.damage:
            print(
                f"cursor file damaged: {store.damage['path']}: {store.damage['error']} "
                f"(usable copy: {store.damage['recovered_from']}; left as it is)"
            )
        for c in result["cursor_past_end"]:
            print(f"cursor past end: group {c['group']} cursor {c['cursor']} > last seq {c['last_seq']}")
        if result["torn_tail"]:
            t = result["torn_tail"]
            print(
                f"torn tail: {t['segment']} offset {t['offset']}, {t['bytes']} bytes "
                f"(a write in progress, or cut on the next start)"
            )
        print(
            f"journal {directory}: {result['segments']} segment(s), {result['records']} records, "
            f"last seq {result['last_seq']}: " + (f"{len(result['damaged'])} damaged range(s)" if bad else "ok")
        )
    return ExitCode.JOURNAL_DAMAGED if bad else ExitCode.OK


def cmd_journal(args) -> int:
    cfg = _load(args)
    if args.action == "verify":
        if cfg.engine == "nats":
            print("journal verify: not applicable under engine nats: JetStream checks its own store")
            return ExitCode.OK
        return cmd_journal_verify(cfg, args)
    if args.action == "info" and cfg.engine == "nats":
        from nexus.cli import natsviews

        return natsviews.journal_info(_router(cfg).status(), args.json)
    if args.action == "info":
        status = _router(cfg).status()
        info = {
            "journal": status["router"]["journal"],
            "groups": {n: {"lag": g["lag"], "cursor_min": g["cursor_min"]} for n, g in status["groups"].items()},
        }
        if args.json:
            _print_json(info)
        else:
            j = info["journal"]
            print(f"journal {j['dir']}: seq {j['first_seq']}..{j['last_seq']}, {j['bytes']} bytes, fsync={j['fsync']}")
            for s in j["segments"]:
                print(f"  {s['file']}  seq {s['first']}..{s['last']}  {s['bytes']} bytes")
            for d in j.get("damaged", []):
                print(
                    f"  damaged: {d['segment']} offset {d['offset']}, {d['bytes']} bytes, "
                    f"seq {d['first_seq']}..{d['last_seq'] or '?'}"
                )
            for c in j.get("cursor_past_end", []):
                print(f"  cursor past end at start: group {c['group']} cursor {c['cursor']} > last seq {c['last_seq']}")
            for name, g in info["groups"].items():
                print(f"  group {name}: cursor>={g['cursor_min']} lag={g['lag']}")
        return ExitCode.OK
    if args.group is None:
        raise NexusError("journal replay needs --group GROUP")
    value = args.from_
    try:
        from_seq, from_time = int(value), 0.0
    except ValueError:
        try:
            from_time = float(value) if value.replace(".", "", 1).isdigit() else _parse_time(value)
        except ValueError:
            raise NexusError(f"--from {value!r}: expected a seq number or an ISO time") from None
        from_seq = 0
    router = _router(cfg)
    result = router.replay(args.group, from_seq, from_time)
    if "error" in result:
        raise NexusError(result["error"])
    _print_json(result) if args.json else print(
        f"group {args.group}: replaying from seq {result['from_seq']} ({result['events']} events)", flush=True
    )
    if progress.wanted(args) and isinstance(result["events"], int):
        _follow_replay(router, args.group, result["events"])
    return ExitCode.OK


FOLLOW_INTERVAL = 0.25  # seconds between two status requests while following a replay


def _follow_replay(router: CoordClient, group: str, events: int) -> None:
    """On a terminal: the group's lag (router status) down to 0, as events handled of
    those replayed. Ctrl-C stops following only: the replay goes on in the router."""
    total = max(events, 1)
    try:
        with progress.track(True, f"replay {group}", total, "events") as bar:
            while True:
                lag = router.status()["groups"].get(group, {}).get("lag")
                if not isinstance(lag, int):
                    lag = total  # the router is recovering: nothing handled yet that we can see
                total = max(total, lag)  # new events arrived meanwhile: they are to handle too
                bar.update(total - lag, total)
                if lag == 0:
                    return
                time.sleep(FOLLOW_INTERVAL)
    except KeyboardInterrupt:
        print(
            f"stopped following; the replay of group {group} goes on in the router (nexus status shows its lag)",
            file=sys.stderr,
        )


# -- dead letters ---------------------------------------------------------------------------
def _when(ts: float | None) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(ts)) if ts else "-"


def cmd_dlq(args) -> int:
    cfg = _load(args)
    ids = args.ids or []
    if args.action in ("show",) and len(ids) != 1:
        raise NexusError("dlq show needs exactly one ID")
    if args.action in ("replay", "purge") and not (ids or args.group or args.all):
        raise NexusError(f"dlq {args.action} needs IDs, --group G or --all")
    if args.action == "replay" and not ids:
        result = _replay_dead_letters(_router(cfg), args)
    else:
        result = _router(cfg).dead_letters(args.action, ids, args.group, args.type, args.all)
    if "error" in result:
        raise NexusError(result["error"])
    if args.json:
        _print_json(result)
        return ExitCode.OK
    if args.action == "list":
        rows = result["dead_letters"]
        print(f"{'ID':>5} {'GROUP':<12} {'TYPE':<24} {'ATTEMPTS':>8} {'LAST FAILED':<19}  ERROR")
        for r in rows:
            print(
                printable(
                    f"{r['id']:>5} {r['group']:<12} {r['type']:<24} {r['attempts']:>8} "
                    f"{_when(r['last_failed']):<19}  {r['error_type']}: {r['error'][:80]}"
                )
            )
        total = result.get("total", len(rows))
        if total > len(rows):
            print(f"{len(rows)} of {total} dead letter(s) shown (the oldest; narrow with --group or --type)")
        else:
            print(f"{len(rows)} dead letter(s)")
    elif args.action == "show":
        r = result["dead_letter"]
        for key in (
            "id",
            "group",
            "event_id",
            "type",
            "source",
            "seq",
            "partition",
            "member",
            "attempts",
            "failures",
            "status",
        ):
            print(printable(f"{key:>12}: {r[key]}"))
        print(f"{'first_failed':>12}: {_when(r['first_failed'])}\n{'last_failed':>12}: {_when(r['last_failed'])}")
        # handler error texts and payloads come from events: control characters escaped
        print(printable(f"{'error':>12}: {r['error_type']}: {r['error']}"))
        print(printable(f"{'payload':>12}: {json.dumps(r['event']['payload'], default=str)}"))
        print("traceback:\n" + "\n".join(printable(line) for line in r["traceback"].rstrip().splitlines()))
    elif args.action == "replay":
        print(f"replayed {len(result['replayed'])} dead letter(s)")
    else:
        print(f"purged {result['purged']} dead letter(s)")
    return ExitCode.OK


def _reload_line(r: dict) -> str:
    """The last reload, for `nexus status`: when, how it went, and while it runs, where."""
    from datetime import datetime

    when = datetime.fromtimestamp(r["last"]).strftime("%H:%M:%S")
    if r.get("in_progress"):
        how = f"in progress: {r.get('progress', '')}"
    elif r.get("ok"):
        how = f"ok, {len(r.get('changes', []))} change(s)"
    else:
        how = "failed"
    line = f"reload at {when}: {how}"
    if r.get("error"):
        line += f" ({r['error']})"
    return printable(line)


DLQ_REPLAY_PAGE = 100  # dead letters per replay request: progress moves, the router loop never stalls long


def _replay_dead_letters(router: CoordClient, args) -> dict[str, Any]:
    """Every dead letter of --group G or --all, a page at a time (the router pages by row
    id, so a replayed event that fails again is not replayed twice in this run)."""
    replayed: list[dict] = []
    after = 0
    try:
        with progress.track(progress.wanted(args), "replay dead letters", None, "dead letters") as bar:
            while True:
                page = router.dead_letters(
                    "replay", None, args.group, args.type, args.all, after=after, limit=DLQ_REPLAY_PAGE
                )
                if "error" in page:
                    if replayed:  # say what is done before the reason it stopped
                        print(f"replayed {len(replayed)} dead letter(s) before the error", file=sys.stderr)
                    return page
                replayed += page["replayed"]
                after = page["next_after"]
                bar.update(len(replayed), len(replayed) + page["remaining"])
                if not page["remaining"]:
                    return {"replayed": replayed}
    except KeyboardInterrupt:
        # the pages replayed stay replayed; the same command again replays the rest
        print(f"interrupted after {len(replayed)} dead letter(s) replayed; run it again for the rest", file=sys.stderr)
        raise


def cmd_reload(args) -> int:
    cfg = _load(args)
    if not args.dry_run and transport.unreachable(cfg.control_endpoint):
        # no launcher: a router run alone re-reads the file itself (a launcher that is
        # there but slow is waited for, never bypassed: it would apply the file twice)
        result = _router(cfg).reload()
    else:
        # the launcher validates the file and hands the router (and every child it
        # restarts later) what it checked; it may wait for the router to read the
        # journal for a group added with `start: earliest`
        result = _launcher(cfg).reload(dry_run=args.dry_run, timeout=RELOAD_TIMEOUT)
    if "error" in result:
        raise ConfigError(result["error"])
    if args.json:
        _print_json(result)
        return ExitCode.OK
    changes = result.get("changes")
    if changes is None:  # the router's answer (no launcher): its groups and limits
        groups = result.get("groups", {})
        changes = [f"group {g}: {what}" for what in ("added", "removed", "rerouted") for g in groups.get(what, [])]
        changes = [f"{line}; {DROPPED}" if line.endswith(": removed") else line for line in changes]
    if args.dry_run:
        print("dry run, nothing applied; would change:" if changes else "dry run: nothing would change")
    elif changes:
        print("applied:")
    elif not result["needs_restart"]:
        print("nothing changed")
    for line in changes:
        print(f"  {line}")
    if result.get("rate_limits") is not None:
        print(f"rate limits now: {json.dumps(result['rate_limits'])}")
    if result.get("in_progress"):
        rolling = result.get("rolling") or []
        what = f"rolling restart of {', '.join(rolling)}" if rolling else "draining and restarts"
        print(f"in progress: {what}; `nexus status` shows it until done")
    if result["needs_restart"]:
        verb = "would need" if args.dry_run else "changed, needs"
        print(f"{verb} a restart to apply: {', '.join(result['needs_restart'])}")
    return ExitCode.OK


# -- dashboard ------------------------------------------------------------------------------
PROMETHEUS_SNIPPET = """\
scrape_configs:
  - job_name: nexus
    authorization: {{credentials_file: {file}}}
    static_configs: [{{targets: ["{target}"]}}]"""


def cmd_dashboard(args) -> int:
    """The dashboard's address with its token, and the Prometheus scrape config. Reading
    the token takes what every other command takes: the config and the data dir."""
    from urllib.parse import quote, urlsplit

    from nexus.http import credential
    from nexus.http.listen import local_url

    cfg = config_mod.load(args.config, args.env)
    if not cfg.http.listen:
        raise ConfigError(f"{cfg.source}: http.listen is off: no dashboard (set it, e.g. 127.0.0.1:9464, and restart)")
    token = credential.load(cfg)
    url = local_url(cfg.http.listen)
    if args.token:
        print(token)
        return int(ExitCode.OK)
    link = f"{url}?token={quote(token, safe='')}"
    if args.url:
        print(link)
        return int(ExitCode.OK)
    generated = not cfg.http.token
    print(f"dashboard: {link}")
    print("  open it once: the page keeps a session cookie and drops the token from the address bar")
    print()
    print("Prometheus (prometheus.yml), with the token in a file its user can read:")
    print("  nexus dashboard --token > /etc/prometheus/nexus.token   # then chown it to Prometheus' user, mode 0600")
    if generated:
        print(f"  (the token is {credential.path_of(cfg)}: made once, kept across restarts)")
    print()
    print(PROMETHEUS_SNIPPET.format(file="/etc/prometheus/nexus.token", target=urlsplit(url).netloc))
    return int(ExitCode.OK)


def _parse_time(text: str) -> float:
    from datetime import datetime

    dt = datetime.fromisoformat(text)
    if dt.tzinfo is None:
        dt = dt.replace(tzinfo=UTC)
    return dt.timestamp()


# -- main -------------------------------------------------------------------------------------
def build_parser() -> argparse.ArgumentParser:
    # -c and --env before or after the command: the top-level parser sets the defaults,
    # each subcommand's copy leaves the value alone unless given (SUPPRESS; a plain
    # default would overwrite a top-level -c with None)
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument(
        "-c", "--config", default=argparse.SUPPRESS, help="config file (default: $NEXUS_CONFIG or config/default.yaml)"
    )
    common.add_argument("--env", default=argparse.SUPPRESS, help="config overlay name (default: $NEXUS_ENV)")
    parser = argparse.ArgumentParser(prog="nexus", description="Control a Nexus pipeline.")
    parser.add_argument("-c", "--config", help="config file (default: $NEXUS_CONFIG or config/default.yaml)")
    parser.add_argument("--env", help="config overlay name (default: $NEXUS_ENV)")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("send", parents=[common], help="send an event")
    p.add_argument("type")
    p.add_argument("--source", default="cli")
    p.add_argument("--key")
    p.add_argument("--priority", type=int, default=5)
    p.add_argument("--v", type=int, default=1, help="contract version")
    p.add_argument("--payload", default="{}", help="JSON payload, or - for JSON lines on stdin")
    p.add_argument("--fire", action="store_true", help="fire-and-forget (no ACK)")
    p.add_argument("--timeout", type=float, default=10.0)
    p.set_defaults(func=cmd_send)

    p = sub.add_parser("status", parents=[common], help="processes, groups, router counters")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_status)

    p = sub.add_parser("scale", parents=[common], help="set the number of local processes of a group")
    p.add_argument("group")
    p.add_argument("n", type=int)
    p.set_defaults(func=cmd_scale)

    p = sub.add_parser("worker", parents=[common], help="run one member of a group in this terminal")
    p.add_argument("group")
    p.add_argument("--name", help="member name (default: GROUP-HOST-PID)")
    p.set_defaults(func=cmd_worker)

    p = sub.add_parser("tail", parents=[common], help="print accepted events as they arrive")
    p.add_argument("pattern", nargs="?", default="*")
    p.add_argument("--json", action="store_true")
    p.add_argument("--count", type=int, default=0, help="stop after N events")
    p.add_argument("--seconds", type=float, default=0, help="stop after this long")
    p.set_defaults(func=cmd_tail)

    p = sub.add_parser("journal", parents=[common], help="journal info | replay | verify")
    p.add_argument("action", choices=["info", "replay", "verify"])
    p.add_argument("--group")
    p.add_argument("--from", dest="from_", default="0", help="seq number or ISO time")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_journal)

    p = sub.add_parser("dlq", parents=[common], help="dead letters: list | show | replay | purge")
    p.add_argument("action", choices=["list", "show", "replay", "purge"])
    p.add_argument("ids", nargs="*", type=int, metavar="ID")
    p.add_argument("--group")
    p.add_argument("--type")
    p.add_argument("--all", action="store_true")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_dlq)

    p = sub.add_parser("reload", parents=[common], help="re-read the config and apply what changed live")
    p.add_argument("--dry-run", action="store_true", help="print what would change, apply nothing")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_reload)

    p = sub.add_parser("dashboard", parents=[common], help="the dashboard's address with its token; Prometheus config")
    p.add_argument("--url", action="store_true", help="print only the address (with the token)")
    p.add_argument("--token", action="store_true", help="print only the token")
    p.set_defaults(func=cmd_dashboard)

    keys.add_parser(sub, common)
    tokens.add_parser(sub, common)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args))
    except NexusError as exc:
        from nexus.common import redact

        print(f"nexus: {redact.scrub(str(exc))}", file=sys.stderr)  # never a secret of the config
        return int(exc.exit_code)
    except KeyboardInterrupt:
        return int(ExitCode.INTERRUPTED)


if __name__ == "__main__":
    sys.exit(main())
