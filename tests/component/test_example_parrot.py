"""examples/parrot_producer.py as a subprocess against a real Router (and a recorder
member subscribed to parrot.*) running in threads."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import msgspec
import pytest
from conftest import REPO, recorder_group
from recorder import read_handled

from nexus import config
from nexus.router.journal import entry_decoder
from nexus.testing import wait_for

EXAMPLE = str(Path(REPO) / "examples" / "parrot_producer.py")


def run_example(*args: str, stdin: str | None = None, timeout: float = 60) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, EXAMPLE, *args],
        input=stdin,
        capture_output=True,
        text=True,
        cwd=REPO,
        env=dict(os.environ),
        timeout=timeout,
    )


def journaled(router) -> dict[str, dict]:
    """id -> event map, for every parrot event in the router's journal."""
    events = {}
    for _, body in router.journal.read(0, 10_000):
        entry = entry_decoder.decode(body)
        event = msgspec.msgpack.decode(entry.event)
        events[event["id"]] = event
    return events


@pytest.fixture
def pipeline(tmp_path, config_factory, components):
    out = tmp_path / "out"
    path = config_factory(workers={"parrot": recorder_group(out, subscribe=["parrot.*"])})
    cfg = config.load(path)
    router = components.router(cfg)
    wait_for(
        lambda: os.path.exists(cfg.coord[len("ipc://") :]) and os.path.exists(cfg.confirm[len("ipc://") :]),
        10,
        message="router bound",
    )
    components.member(cfg, "parrot", "parrot-0")
    yield cfg, router, out
    stop_components(components, router)


def stop_components(components, router) -> None:
    """Stop member and router now; destroy the router's zmq context if its cleanup left it
    open (see tests/component/test_raw_protocol.py), so garbage collection cannot block the session."""
    components.close()
    sock = getattr(router, "ingest", None)
    if sock is not None and not sock.context.closed:
        sock.context.destroy(linger=0)


def handled_ids(out: Path) -> set[str]:
    return {row[1] for row in read_handled(str(out))}


def test_demo_notifications_are_journaled_and_delivered(pipeline):
    cfg, router, out = pipeline
    result = run_example("--endpoint", cfg.confirm, "--count", "8")
    assert result.returncode == 0, result.stderr
    ids = result.stdout.split()
    assert len(ids) == 8 and len(set(ids)) == 8
    wait_for(lambda: handled_ids(out) == set(ids), 20, message="8 notifications handled")
    events = journaled(router)
    assert set(events) == set(ids)
    kinds = set()
    for event_id in ids:
        ev = events[event_id]
        kind = ev["payload"]["notification_type"]
        kinds.add(kind)
        assert ev["type"] == "parrot.notification" and ev["source"] == "parrot"
        assert ev["key"] == ev["payload"]["app_id"]
        assert ev.get("priority", 5) == (2 if kind in ("email", "message") else 5)
        assert (ev["payload"].get("email_data") is not None) == (kind == "email")
    assert kinds == {"email", "message", "calendar", "system"}


def test_jsonl_from_stdin_with_a_custom_source(pipeline):
    cfg, router, out = pipeline
    lines = [
        {
            "app_id": "com.squirrel.slack.slack",
            "app_name": "Slack",
            "title": "#general",
            "body": "hi",
            "notification_type": "message",
            "received_at": 1720000000.25,
        },
        {
            "app_id": "Windows.SystemToast.BatterySaver",
            "app_name": "Battery",
            "title": "Battery low",
            "body": "10% left",
            "notification_type": "system",
        },  # received_at defaults to now
    ]
    stdin = "\n".join(json.dumps(line) for line in lines) + "\n\n"
    result = run_example("--endpoint", cfg.confirm, "--source", "parrot:laptop", "--from-jsonl", "-", stdin=stdin)
    assert result.returncode == 0, result.stderr
    ids = result.stdout.split()
    assert len(ids) == 2
    wait_for(lambda: handled_ids(out) == set(ids), 20, message="2 notifications handled")
    events = journaled(router)
    first, second = events[ids[0]], events[ids[1]]
    assert first["source"] == second["source"] == "parrot:laptop"
    assert {k: v for k, v in first["payload"].items() if v is not None} == lines[0]  # SDK sends email_data: nil
    assert first["priority"] == 2
    assert second["payload"]["received_at"] > 0 and "priority" not in second  # default 5, omitted


def test_invalid_line_gives_one_line_error_and_nonzero_exit(pipeline, tmp_path):
    cfg, router, out = pipeline
    good = {"app_id": "MSTeams", "app_name": "Teams", "title": "Tom", "body": "ok", "notification_type": "message"}
    bad = {
        "app_id": "Microsoft.Office.OUTLOOK.EXE.15",
        "app_name": "Outlook",
        "title": "Ana",
        "body": "Q3",
        "notification_type": "email",
    }  # email without email_data
    path = tmp_path / "notifications.jsonl"
    path.write_text(json.dumps(good) + "\n" + json.dumps(bad) + "\n" + json.dumps(good) + "\n")
    result = run_example("--endpoint", cfg.confirm, "--from-jsonl", str(path))
    assert result.returncode == 4  # ExitCode.INVALID_EVENT
    error = result.stderr.strip()
    assert len(error.splitlines()) == 1, result.stderr
    assert error.startswith("parrot_producer: ") and "line 2" in error and "email_data is required" in error
    assert "Traceback" not in result.stderr
    ids = result.stdout.split()
    assert len(ids) == 1  # the line before was sent, not after
    wait_for(lambda: handled_ids(out) == set(ids), 20, message="the valid notification handled")
    assert set(journaled(router)) == set(ids)


def test_router_not_answering_gives_one_line_error(tmp_path):
    endpoint = f"ipc://{tmp_path}/nobody-listens"
    result = run_example("--endpoint", endpoint, "--count", "1", "--timeout", "1")
    assert result.returncode == 5  # ExitCode.UNREACHABLE
    error = result.stderr.strip()
    assert len(error.splitlines()) == 1 and "did not confirm" in error, result.stderr
    assert result.stdout == ""
