"""The agent sink (workers/agent.py) in a launched pipeline with real LangGraph graphs.

- examples/agent/nexus.yaml as written (rewritten only for isolation: data dir, ipc
  endpoints, the notify log): mail events reach the example graph, its notify node writes
  the urgent ones, its result comes back as `mail.triaged` follow-ups with the cause's
  correlation id;
- a node that always raises: each event is run `retry.attempts` times, then dead-lettered;
- a node that raises ConnectionRefusedError (a `dependency_errors` class): the breaker
  opens, nothing is dead-lettered, and every event goes through once the "service" is up.
Each prints an AGENT-REPORT line (sent, ACKed, reached the graph, follow-ups, dead
letters, lost).
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from nexus import Producer, config
from nexus.testing import wait_for

pytest.importorskip("langgraph", reason="the agent extra is not installed (pip install '.[agent]')")
pytestmark = pytest.mark.system

REPO = Path(__file__).resolve().parents[2]
EXAMPLE = REPO / "examples" / "agent" / "nexus.yaml"
WAIT = 60.0  # members import langgraph (seconds on a loaded machine)


def read_lines(path) -> list[str]:
    try:
        with open(path) as f:
            return [line.rstrip("\n") for line in f if line.endswith("\n")]
    except FileNotFoundError:
        return []


def cli(path, *args) -> dict | str:
    result = subprocess.run(
        [sys.executable, "-m", "nexus", *args, "-c", str(path)], capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout) if "--json" in args else result.stdout


def _mail(uid: int, sender: str, subject: str) -> dict:
    return {"account": "me", "mailbox": "INBOX", "uid": uid, "uidvalidity": 1, "from": sender, "subject": subject}


def test_the_example_triages_mail_and_sends_the_result_on(tmp_path, launched):
    cfg = yaml.safe_load(EXAMPLE.read_text())
    out, notified = tmp_path / "followups.jsonl", tmp_path / "notified.log"
    cfg["data_dir"] = str(tmp_path / "var")
    cfg["router"].update(ingest="ipc://{data_dir}/run/ingest", confirm="ipc://{data_dir}/run/confirm")
    triage = cfg["workers"]["triage"]
    triage["options"]["graph_options"]["notify_log"] = str(notified)
    triage["start"] = "earliest"
    cfg["workers"]["followups"] = {
        "handler": "agent_graphs:record_payload",
        "subscribe": ["mail.triaged"],
        "start": "earliest",
        "options": {"out": str(out)},
    }
    path = tmp_path / "nexus.yaml"
    path.write_text(yaml.safe_dump(cfg))
    (tmp_path / "mail_triage.py").symlink_to(EXAMPLE.parent / "mail_triage.py")  # beside the config, as there

    mails = [
        (_mail(1, "ops@example.com", "URGENT: the build server is down"), "notify"),
        (_mail(2, "news@example.com", "Weekly digest"), "ignore"),
        (_mail(3, "boss@example.com", "a question"), "notify"),  # a VIP in graph_options
        (_mail(4, "shop@example.com", "Your invoice is overdue"), "notify"),
        (_mail(5, "friend@example.com", "lunch?"), "ignore"),
    ]
    launched(path)
    with Producer(config.load(path).confirm, source="mail") as producer:
        ids = [producer.send("email.received", m, key=f"inbox{i % 2}") for i, (m, _) in enumerate(mails)]
        producer.flush(30)
    rows = wait_for(
        lambda: (r := [json.loads(x) for x in read_lines(out)]) and len(r) >= len(mails) and r,
        WAIT,
        message="a mail.triaged follow-up per mail",
    )
    by_cause = {r["correlation_id"]: r for r in rows}
    assert sorted(by_cause) == sorted(ids) and len(rows) == len(mails)  # one each, none lost
    for event_id, (mail, decision) in zip(ids, mails, strict=True):
        payload = by_cause[event_id]["payload"]
        assert payload["decision"] == decision and payload["subject"] == mail["subject"]
        assert payload["sender"] == mail["from"] and payload["reason"]
        assert set(payload) == {"decision", "reason", "subject", "sender"}  # output.fields
    notified_lines = [json.loads(x) for x in read_lines(notified)]
    assert sorted(n["subject"] for n in notified_lines) == sorted(m["subject"] for m, d in mails if d == "notify")
    print(
        f"\nAGENT-REPORT example: sent={len(mails)} acked={len(ids)} followups={len(rows)} "
        f"notified={len(notified_lines)} lost={len(set(ids) - set(by_cause))}"
    )


def _group(graph: str, **graph_options) -> dict:
    return {
        "handler": "workers.agent:Agent",
        "subscribe": ["test.*"],
        "start": "earliest",
        "options": {"graph": graph, "graph_options": graph_options, "input": {"id": "{event.id}"}},
    }


def test_a_failing_node_is_retried_then_dead_lettered(tmp_path, config_factory, launched):
    calls = tmp_path / "calls.log"
    group = _group("agent_graphs:failing", calls=str(calls))
    group["retry"] = {"attempts": 3, "backoff": ["0.1s"]}
    path = config_factory(workers={"agent": group})
    launched(path)
    with Producer(config.load(path).confirm, source="t") as producer:
        ids = [producer.send("test.agent", {"i": i}, key=f"k{i}") for i in range(3)]
        producer.flush(30)
    listed = wait_for(
        lambda: len(r := cli(path, "dlq", "list", "--json")["dead_letters"]) == len(ids) and r,
        WAIT,
        message="3 dead letters",
    )
    assert sorted(r["event_id"] for r in listed) == sorted(ids)
    assert all(r["attempts"] == 3 and r["error_type"] == "RuntimeError" for r in listed)
    assert all("node exploded on" in r["error"] for r in listed)
    runs = read_lines(calls)
    assert sorted(runs) == sorted(ids * 3)  # each event reached the graph once per attempt
    print(
        f"\nAGENT-REPORT failing_node: sent={len(ids)} acked={len(ids)} graph_runs={len(runs)} "
        f"dead_lettered={len(listed)} lost={len(set(ids) - {r['event_id'] for r in listed})}"
    )


def test_a_service_that_is_down_opens_the_breaker_and_nothing_is_dead_lettered(tmp_path, config_factory, launched):
    calls, up = tmp_path / "calls.log", tmp_path / "service-up"
    group = _group("agent_graphs:needs_service", calls=str(calls), up=str(up))
    group["retry"] = {"attempts": 2, "backoff": ["0.1s"]}
    group["breaker"] = {"failures": 3, "window": "60s", "reset": "0.5s"}
    path = config_factory(workers={"agent": group})
    p = launched(path)
    with Producer(config.load(path).confirm, source="t") as producer:
        ids = [producer.send("test.agent", {"i": i}, key=f"k{i % 4}") for i in range(12)]
        producer.flush(30)

    def breaker():
        members = cli(path, "status", "--json")["groups"]["agent"]["members"]
        return members[0].get("breaker") if members else None

    wait_for(lambda: breaker() in ("open", "half_open"), WAIT, message="the breaker open")
    assert "breaker_opened" in p.output() and "AgentUnavailable" in p.output()
    up.write_text("up")  # the service comes back
    handled = wait_for(lambda: len(r := read_lines(calls)) >= len(ids) and r, WAIT, message="every event handled")
    wait_for(lambda: breaker() == "closed", WAIT, message="the breaker closed")
    status = cli(path, "status", "--json")
    assert sorted(set(handled)) == sorted(ids)  # none lost
    assert status["groups"]["agent"]["dead_letters"] == 0  # none dead-lettered for an outage
    print(
        f"\nAGENT-REPORT service_down: sent={len(ids)} acked={len(ids)} handled={len(set(handled))} "
        f"handled_twice={len(handled) - len(set(handled))} dead_lettered=0 lost={len(set(ids) - set(handled))}"
    )
