"""System tests of failure handling: retries, dead letters, circuit breaker, rate limits."""

from __future__ import annotations

import json
import subprocess
import sys
import threading
import time

import pytest
import yaml
from conftest import recorder_group
from recorder import read_handled
from toasty_server import ToastyProcess

from nexus import Producer, config
from nexus.testing import free_port, wait_for

pytestmark = pytest.mark.system


def cli(path, *args) -> dict | str:
    result = subprocess.run(
        [sys.executable, "-m", "nexus", *args, "-c", str(path)], capture_output=True, text=True, timeout=30
    )
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout) if "--json" in args else result.stdout


def test_handler_failing_twice_succeeds_on_the_third_attempt(tmp_path, config_factory, launched):
    out = tmp_path / "out"
    path = config_factory(
        workers={
            "rec": recorder_group(out, options={"fail_first": 2}, retry={"attempts": 3, "backoff": ["0.2s", "0.4s"]})
        }
    )
    p = launched(path)
    cfg = config.load(path)
    with Producer(cfg.confirm, source="flaky") as producer:
        ids = [producer.send("test.flaky", {"i": i}, key=f"k{i}") for i in range(5)]
    wait_for(lambda: len(read_handled(str(out))) == 5, 30, message="5 handled")
    rows = read_handled(str(out))
    assert sorted(r[1] for r in rows) == sorted(ids) and all(r[5] == 3 for r in rows)
    assert "handler_failed" in p.output()
    status = cli(path, "status", "--json")
    member = status["groups"]["rec"]["members"][0]
    wait_for(
        lambda: cli(path, "status", "--json")["groups"]["rec"]["members"][0].get("failed") == 10,
        10,
        message="failures counted in status",
    )
    assert status["groups"]["rec"]["dead_letters"] == 0 and member["name"] == "rec-0"


def test_poison_event_goes_to_dlq_and_is_replayed_after_a_fix(tmp_path, config_factory, launched):
    out, fixed = tmp_path / "out", tmp_path / "fixed"
    group = recorder_group(out, options={"fixed": str(fixed)}, retry={"attempts": 2, "backoff": ["0.1s"]})
    group["handler"] = "recorder:poisonable"
    path = config_factory(workers={"rec": group})
    launched(path)
    cfg = config.load(path)
    with Producer(cfg.confirm, source="poison") as producer:
        poison = producer.send("test.meal", {"poison": True}, key="same")
        after = [producer.send("test.meal", {"i": i}, key="same") for i in range(3)]  # same partition
    # the partition moves on past the poison event
    wait_for(lambda: {r[1] for r in read_handled(str(out))} == set(after), 30, message="events after the poison")
    listed = wait_for(lambda: cli(path, "dlq", "list", "--json")["dead_letters"], 10, message="a dead letter")
    assert len(listed) == 1
    row = listed[0]
    assert row["event_id"] == poison and row["group"] == "rec" and row["error_type"] == "ValueError"
    assert row["attempts"] == 2 and "cannot digest" in row["error"]
    shown = cli(path, "dlq", "show", str(row["id"]), "--json")["dead_letter"]
    assert shown["event"]["payload"] == {"poison": True} and "ValueError" in shown["traceback"]
    assert cli(path, "status", "--json")["groups"]["rec"]["dead_letters"] == 1
    table = cli(path, "dlq", "list")
    assert "ValueError" in table and "1 dead letter(s)" in table

    fixed.write_text("deployed")  # the fix
    started = time.monotonic()
    assert "replayed 1" in cli(path, "dlq", "replay", str(row["id"]))
    wait_for(lambda: poison in {r[1] for r in read_handled(str(out))}, 30, message="replayed event handled")
    print(
        f"\nFAILURE-REPORT dlq_round_trip: dead_lettered_after_attempts={row['attempts']} "
        f"replay_command_to_handled_ms={(time.monotonic() - started) * 1000:.0f}"
    )
    assert cli(path, "dlq", "list", "--json")["dead_letters"] == []
    assert cli(path, "status", "--json")["groups"]["rec"]["dead_letters"] == 0
    assert "purged 1" in cli(path, "dlq", "purge", "--all")


def test_breaker_opens_while_toasty_is_down_and_every_event_arrives_after(tmp_path, config_factory, launched):
    port = free_port()
    group = {
        "handler": "workers.toasty:Toasty",
        "subscribe": ["parrot.*"],
        "processes": 1,
        "start": "earliest",
        "retry": {"attempts": 2, "backoff": ["0.1s", "0.2s"]},
        "breaker": {"failures": 3, "window": "60s", "reset": "0.5s"},
        "options": {"target": f"127.0.0.1:{port}", "timeout": 1.0},
    }
    path = config_factory(workers={"toasty": group})
    p = launched(path)
    cfg = config.load(path)
    with Producer(cfg.confirm, source="parrot") as producer:
        ids = [
            producer.send(
                "parrot.notification",
                {
                    "app_id": "chat",
                    "app_name": "Chat",
                    "title": f"hello {i}",
                    "body": "hi",
                    "notification_type": "message",
                    "received_at": 1.0,
                },
                key=f"k{i % 4}",
            )
            for i in range(20)
        ]

    def breaker_state():
        members = cli(path, "status", "--json")["groups"]["toasty"]["members"]
        return members[0].get("breaker") if members else None

    wait_for(lambda: breaker_state() in ("open", "half_open"), 30, message="breaker open")
    assert "breaker_opened" in p.output()
    toasty = ToastyProcess(port=port)  # the dependency comes back
    try:
        seen = set()
        while len(seen) < 20:
            seen.add(toasty.next_notification()["event_id"])
        assert seen == set(ids)
        wait_for(lambda: breaker_state() == "closed", 20, message="breaker closed")
    finally:
        toasty.stop()
    assert "breaker_closed" in p.output()
    status = cli(path, "status", "--json")
    assert status["groups"]["toasty"]["dead_letters"] == 0  # nothing dead-lettered for an outage


def test_flooding_source_is_limited_while_another_flows(tmp_path, config_factory, launched):
    out = tmp_path / "out"
    path = config_factory(
        router={
            "ingest": "ipc://{data_dir}/run/ingest",
            "confirm": "ipc://{data_dir}/run/confirm",
            "rate_limits": {"sources": {"flood": {"rate": 100, "burst": 50}}},
        },
        workers={"rec": recorder_group(out, processes=1)},
    )
    launched(path)
    cfg = config.load(path)
    flood_ids: list[str] = []

    def flood():
        with Producer(cfg.confirm, source="flood") as producer:
            flood_ids.extend(producer.send("test.flood", {"i": i}) for i in range(400))
            producer.flush(60)

    thread = threading.Thread(target=flood)
    thread.start()
    try:
        with Producer(cfg.confirm, source="steady") as producer:
            steady = [producer.send("test.steady", {"i": i}) for i in range(1000)]
            producer.flush(30)
        wait_for(lambda: set(steady) <= {r[1] for r in read_handled(str(out))}, 30, message="steady handled")
        handled = {r[1] for r in read_handled(str(out))}
        flood_done_then = len(handled & set(flood_ids))
    finally:
        thread.join(60)
    assert not thread.is_alive()
    wait_for(lambda: set(flood_ids) <= {r[1] for r in read_handled(str(out))}, 30, message="flood handled")
    status = cli(path, "status", "--json")
    limited = status["router"]["rejected_by_reason"].get("rate_limited", 0)
    print(
        f"\nFAILURE-REPORT rate_limit: flood=400 steady=1000 flood_done_when_steady_done={flood_done_then} "
        f"rate_limited_nacks={limited}"
    )
    assert limited > 0 and flood_done_then < 400
    assert status["router"]["rate_limits"]["flood"] == {"rate": 100, "burst": 50}

    # limits change with the config
    raw = yaml.safe_load(path.read_text())
    raw["router"]["rate_limits"]["sources"]["flood"] = {"rate": 500, "burst": 100}
    path.write_text(yaml.safe_dump(raw))
    assert "flood" in cli(path, "reload")
    assert cli(path, "status", "--json")["router"]["rate_limits"]["flood"] == {"rate": 500, "burst": 100}
