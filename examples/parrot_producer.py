#!/usr/bin/env python
"""An external Parrot-style producer: desktop notifications -> `parrot.notification`.

Parrot captures Windows desktop notifications (Outlook, Teams, Slack, the calendar,
system toasts). This stand-in sends them to a Nexus router with the SDK in confirm
mode, so every id it prints has been journaled by the router:

    python examples/parrot_producer.py --count 8
    python examples/parrot_producer.py --from-jsonl notifications.jsonl
    capture-tool | python examples/parrot_producer.py --from-jsonl -

Each JSON line is one `parrot.notification` payload (see nexus/contracts.py);
`received_at` defaults to now. The partition key is `app_id`, so notifications of one
app are handled in order; email and message notifications get priority 2, the rest 5.
Errors are one line on stderr; the exit code is nexus.errors.ExitCode (4: invalid or
rejected notification, 5: router did not confirm in time).
"""

from __future__ import annotations

import argparse
import itertools
import json
import sys
import time
from collections.abc import Iterator

import nexus.contracts  # noqa: F401  registers parrot.notification: payloads are checked before sending
from nexus import NexusError, Producer
from nexus.errors import EventError, ExitCode

EVENT_TYPE = "parrot.notification"
URGENT = {"email", "message"}

DEMO = [
    {
        "app_id": "Microsoft.Office.OUTLOOK.EXE.15",
        "app_name": "Outlook",
        "notification_type": "email",
        "title": "Ana Lima",
        "body": "Q3 report: numbers attached",
        "email_data": {
            "sender": "ana.lima@example.com",
            "subject": "Q3 report",
            "preview": "Hi, the numbers are attached. Can we review them on Friday?",
        },
    },
    {
        "app_id": "MSTeams_8wekyb3d8bbwe!MSTeams",
        "app_name": "Microsoft Teams",
        "notification_type": "message",
        "title": "Tom (Platform)",
        "body": "deploy is green, merging now",
    },
    {
        "app_id": "microsoft.windowscommunicationsapps_8wekyb3d8bbwe!microsoft.windowslive.calendar",
        "app_name": "Calendar",
        "notification_type": "calendar",
        "title": "Standup in 5 minutes",
        "body": "10:00-10:15, Room 3 / Teams",
    },
    {
        "app_id": "Windows.SystemToast.SecurityAndMaintenance",
        "app_name": "Windows Security",
        "notification_type": "system",
        "title": "Virus & threat protection",
        "body": "Scan finished, no threats found",
    },
    {
        "app_id": "com.squirrel.slack.slack",
        "app_name": "Slack",
        "notification_type": "message",
        "title": "#incidents",
        "body": "pager: disk 91% on db-2",
    },
    {
        "app_id": "Microsoft.Office.OUTLOOK.EXE.15",
        "app_name": "Outlook",
        "notification_type": "email",
        "title": "GitHub",
        "body": "[nexus] PR #42 approved",
        "email_data": {"sender": "notifications@github.com", "subject": "[nexus] PR #42 approved"},
    },
]


class InputError(EventError):
    """A notification in the input is not valid JSON or not a valid payload."""


def demo_notifications(count: int) -> Iterator[tuple[str, dict]]:
    for n, template in zip(range(1, count + 1), itertools.cycle(DEMO)):
        yield f"demo {n}", {**template, "received_at": time.time()}


def jsonl_notifications(path: str) -> Iterator[tuple[str, dict]]:
    stream = sys.stdin if path == "-" else open(path, encoding="utf-8")
    name = "stdin" if path == "-" else path
    try:
        for n, line in enumerate(stream, 1):
            if not line.strip():
                continue
            where = f"{name} line {n}"
            try:
                payload = json.loads(line)
            except json.JSONDecodeError as exc:
                raise InputError(f"{where}: not valid JSON: {exc.msg} at column {exc.colno}") from None
            if not isinstance(payload, dict):
                raise InputError(f"{where}: expected a JSON object, got {type(payload).__name__}")
            payload.setdefault("received_at", time.time())
            yield where, payload
    finally:
        if stream is not sys.stdin:
            stream.close()


def send_all(producer: Producer, notifications: Iterator[tuple[str, dict]], timeout: float) -> int:
    """Send one notification at a time and wait for its ACK, so each printed id is
    journaled and an error names the notification that caused it."""
    sent = 0
    for where, payload in notifications:
        kind = payload.get("notification_type")
        try:
            event_id = producer.send(
                EVENT_TYPE, payload, key=payload.get("app_id"), priority=2 if kind in URGENT else 5
            )
            producer.flush(timeout)
        except EventError as exc:  # invalid payload (checked locally) or NACKed by the router
            raise InputError(f"{where}: {exc}") from None
        print(event_id, flush=True)
        sent += 1
    return sent


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description="Send Parrot desktop notifications to a Nexus router.")
    p.add_argument(
        "--endpoint",
        default="tcp://127.0.0.1:5556",
        help="the router's confirm endpoint (router.confirm in the config; default %(default)s)",
    )
    p.add_argument("--source", default="parrot", help="event source (default %(default)s)")
    what = p.add_mutually_exclusive_group()
    what.add_argument(
        "--count",
        type=int,
        default=None,
        metavar="N",
        help="generate N demo notifications: email, message, calendar, system (default 6)",
    )
    what.add_argument(
        "--from-jsonl",
        metavar="FILE",
        help="send the notifications of a JSON-lines file, one payload per line; '-' for stdin",
    )
    p.add_argument(
        "--timeout",
        type=float,
        default=10.0,
        help="seconds to wait for the router's ACK of each notification (default %(default)s)",
    )
    return p


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.count is not None and args.count < 1:
        parser.error("--count must be at least 1")
    if args.timeout <= 0:
        parser.error("--timeout must be positive")
    if args.from_jsonl:
        notifications = jsonl_notifications(args.from_jsonl)
    else:
        notifications = demo_notifications(args.count or len(DEMO))
    try:
        with Producer(args.endpoint, source=args.source) as producer:
            send_all(producer, notifications, args.timeout)
    except OSError as exc:
        print(f"parrot_producer: cannot read {exc.filename}: {exc.strerror}", file=sys.stderr)
        return int(ExitCode.USAGE)
    except NexusError as exc:
        message = " ".join(str(exc).split())  # always one line
        print(f"parrot_producer: {message}", file=sys.stderr)
        return int(exc.exit_code)
    except KeyboardInterrupt:
        return int(ExitCode.INTERRUPTED)
    return int(ExitCode.OK)


if __name__ == "__main__":
    sys.exit(main())
