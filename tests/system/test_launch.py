"""System tests: a real `python -m nexus.launch` process group in a subprocess."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
from collections import Counter

import pytest
from conftest import recorder_group
from recorder import read_handled

from nexus import Producer, config
from nexus.errors import ExitCode
from nexus.testing import pid_alive, wait_for

pytestmark = pytest.mark.system


def nexus_cli(*args, input: str | None = None, timeout: float = 30) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "nexus", *args], capture_output=True, text=True, input=input, timeout=timeout
    )


def _starter(factory, launched):
    def start(wait_ready=True, **overrides):
        path = factory(**overrides)
        return launched(path, wait_ready=wait_ready), config.load(path)

    return start


@pytest.fixture
def pipeline(config_factory, launched):
    return _starter(config_factory, launched)


@pytest.fixture
def engine_pipeline(engine_config, launched):
    """`pipeline` on each engine (tests/conftest.py `engine`): the same test, both engines."""
    return _starter(engine_config, launched)


def test_send_status_and_events_handled(engine_pipeline, tmp_path):
    out = tmp_path / "out"
    p, cfg = engine_pipeline(workers={"rec": recorder_group(out, processes=2)})
    result = nexus_cli("send", "test.ping", "--payload", '{"n": 1}', "-c", p.config_path)
    assert result.returncode == 0, result.stderr
    event_id = result.stdout.strip()
    with Producer(cfg.confirm, source="system-test") as producer:
        ids = {producer.send("test.item", {"i": i}, key=f"k{i % 7}") for i in range(500)}
        producer.flush(20)
    ids.add(event_id)
    wait_for(lambda: len(read_handled(str(out))) >= len(ids), 30, message="all events handled")
    handled = Counter(row[1] for row in read_handled(str(out)))
    assert set(handled) == ids
    assert max(handled.values()) == 1

    status = nexus_cli("status", "--json", "-c", p.config_path)
    assert status.returncode == 0, status.stderr
    data = json.loads(status.stdout)
    names = {proc["name"]: proc for proc in data["processes"]}
    assert set(names) == {"router", "rec-0", "rec-1"}
    assert all(proc["state"] == "running" and proc["pid"] for proc in names.values())
    assert data["router"]["accepted"] == 501
    assert data["groups"]["rec"]["partitions"] == 16
    assert len(data["groups"]["rec"]["members"]) == 2
    wait_for(
        lambda: json.loads(nexus_cli("status", "--json", "-c", p.config_path).stdout)["groups"]["rec"]["lag"] == 0,
        20,
        message="lag 0",
    )

    table = nexus_cli("status", "-c", p.config_path)
    assert "rec-0" in table.stdout and "accepted=501" in table.stdout


def test_scale_up_and_down_mid_stream_handles_every_event_exactly_once(engine_pipeline, tmp_path):
    out = tmp_path / "out"
    p, cfg = engine_pipeline(workers={"rec": recorder_group(out, processes=1)})
    ids: list[str] = []
    phases = [threading.Event(), threading.Event(), threading.Event()]
    failure: list[BaseException] = []

    def produce():
        # 6,000 events: at 2,000 it waits for the scale-up order and goes on while
        # members join; at 3,000 for all three to run; at 4,000 for the scale-down
        # order and goes on while two members leave
        pauses = {2000: phases[0], 3000: phases[1], 4000: phases[2]}
        try:
            with Producer(cfg.confirm, source="scaler") as producer:
                for i in range(6000):
                    if i in pauses:
                        producer.flush(30)
                        assert pauses[i].wait(60)
                    ids.append(producer.send("test.item", {"i": i}, key=f"key-{i % 50}"))
                    if i % 50 == 49:
                        producer.flush(30)
                producer.flush(30)
        except BaseException as exc:
            failure.append(exc)

    thread = threading.Thread(target=produce)
    thread.start()
    try:
        wait_for(lambda: len(ids) >= 2000, 60, message="first 2000 sent")
        assert nexus_cli("scale", "rec", "3", "-c", p.config_path).returncode == 0
        phases[0].set()
        p.wait_members("rec", 3)
        phases[1].set()
        wait_for(lambda: len(ids) >= 4000, 60, message="4000 sent")
        assert nexus_cli("scale", "rec", "1", "-c", p.config_path).returncode == 0
        phases[2].set()
        p.wait_members("rec", 1)
    finally:
        for phase in phases:
            phase.set()
        thread.join(120)
    assert not thread.is_alive() and not failure, failure

    def all_handled():
        return set(ids) <= {row[1] for row in read_handled(str(out))}

    try:
        wait_for(all_handled, 60, message="every event handled")
    finally:
        rows = read_handled(str(out))
        handled = Counter(row[1] for row in rows)
        lost = set(ids) - set(handled)
        duplicates = {k: v for k, v in handled.items() if v > 1}
        print(f"sent={len(ids)} handled={len(rows)} lost={len(lost)} duplicates={len(duplicates)}")
    assert not lost and not duplicates, f"lost {len(lost)}, handled twice {len(duplicates)}"
    assert set(handled) == set(ids)
    assert len({row[0] for row in rows}) == 3  # three members took part
    # per key, events were handled in the order they were sent
    order = {event_id: n for n, event_id in enumerate(ids)}
    for key in range(50):
        seen = [order[r[1]] for r in sorted(rows, key=lambda r: r[2]) if order[r[1]] % 50 == key]
        assert seen == sorted(seen)


def test_killed_worker_is_restarted(engine_pipeline, tmp_path):
    out = tmp_path / "out"
    p, cfg = engine_pipeline(workers={"rec": recorder_group(out, processes=1)})
    before = {x["name"]: x for x in p.processes()}["rec-0"]
    os.kill(before["pid"], signal.SIGKILL)

    def restarted():
        proc = {x["name"]: x for x in p.processes()}["rec-0"]
        return proc["restarts"] == 1 and proc["state"] == "running" and proc["pid"] != before["pid"]

    wait_for(restarted, 20, message="rec-0 restarted")
    p.wait_members("rec", 1)
    with Producer(cfg.confirm, source="after-kill") as producer:
        event_id = producer.send("test.after", {"x": 1})
    wait_for(lambda: any(r[1] == event_id for r in read_handled(str(out))), 20, message="event after restart")


def test_sigterm_stops_everything_cleanly(pipeline, tmp_path):
    out = tmp_path / "out"
    p, cfg = pipeline(workers={"rec": recorder_group(out, processes=2)})
    pids = p.child_pids()
    assert len(pids) == 3
    p.proc.send_signal(signal.SIGTERM)
    assert p.proc.wait(40) == ExitCode.OK
    for pid in pids:
        assert not pid_alive(pid)
    text = p.output()
    assert "shutdown_complete" in text
    # members left before the router stopped: their final acks landed
    assert text.index("member_left") < text.index("router_stopped")


def test_sigkill_of_launcher_leaves_no_orphans(pipeline, tmp_path):
    out = tmp_path / "out"
    p, cfg = pipeline(workers={"rec": recorder_group(out, processes=2)})
    pids = p.child_pids()
    assert len(pids) == 3
    p.proc.kill()
    p.proc.wait(10)
    for pid in pids:
        wait_for(lambda: not pid_alive(pid), 2.0, 0.02, message=f"orphan {pid} to exit")


def test_crash_loop_gives_up_with_a_clear_error(pipeline, tmp_path):
    out = tmp_path / "out"
    p, cfg = pipeline(
        wait_ready=False,
        crash_loop=2,
        workers={
            "rec": recorder_group(out, processes=1),
            "bad": {"handler": "crasher:handle", "processes": 1},
        },
    )
    wait_for(
        lambda: {x["name"]: x for x in p.processes()}.get("bad-0", {}).get("state") == "failed",
        30,
        message="bad-0 marked failed",
    )
    bad = {x["name"]: x for x in p.processes()}["bad-0"]
    assert bad["restarts"] == 2
    assert "crash_loop" in p.output() and "name=bad-0" in p.output()
    assert {x["name"]: x for x in p.processes()}["rec-0"]["state"] == "running"


def test_bad_config_is_one_clear_line(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("workers:\n  w:\n    handler: workers.console:handle\n    procesess: 2\n")
    result = subprocess.run(
        [sys.executable, "-m", "nexus.launch", "-c", str(path)], capture_output=True, text=True, timeout=30
    )
    assert result.returncode == ExitCode.CONFIG
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1
    assert str(path) in lines[0] and "workers.w.procesess: unknown key" in lines[0]


def test_cli_errors_are_one_line_with_named_exit_codes(tmp_path, config_factory):
    path = config_factory(workers={"rec": recorder_group(tmp_path / "out")})
    # nothing running: the router cannot be reached
    result = nexus_cli("status", "-c", str(path))
    assert result.returncode == ExitCode.UNREACHABLE
    assert len(result.stderr.strip().splitlines()) == 1 and "is not running" in result.stderr
    result = nexus_cli("send", "test.x", "--payload", "{nope", "-c", str(path))
    assert result.returncode == ExitCode.INVALID_EVENT and "not valid JSON" in result.stderr
    result = nexus_cli("send", "Not-A-Type", "-c", str(path))
    assert result.returncode == ExitCode.INVALID_EVENT and "dotted lowercase" in result.stderr
    result = nexus_cli("send", "parrot.notification", "--payload", '{"app_id": "x"}', "-c", str(path))
    assert result.returncode == ExitCode.INVALID_EVENT and "contract parrot.notification" in result.stderr
    result = nexus_cli("status", "-c", str(tmp_path / "missing.yaml"))
    assert result.returncode == ExitCode.CONFIG and "not found" in result.stderr


def test_tail_journal_info_and_replay(pipeline, tmp_path):
    out = tmp_path / "out"
    p, cfg = pipeline(workers={"rec": recorder_group(out, processes=1)})
    tail = subprocess.Popen(
        [sys.executable, "-m", "nexus", "tail", "test.*", "--json", "--count", "3", "-c", p.config_path],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        wait_for(lambda: p.router_status()["router"]["tail_subscribers"] >= 1, 20, message="tail subscribed")
        with Producer(cfg.confirm, source="tailed") as producer:
            ids = [producer.send("test.tailed", {"i": i}) for i in range(3)]
        stdout, _ = tail.communicate(timeout=20)
    finally:
        if tail.poll() is None:
            tail.kill()
            tail.wait()
    lines = [json.loads(line) for line in stdout.splitlines()]
    assert [line["id"] for line in lines] == ids
    assert lines[0]["payload"] == {"i": 0} and lines[0]["source"] == "tailed"

    wait_for(lambda: len(read_handled(str(out))) == 3, 20, message="3 handled")
    info = json.loads(nexus_cli("journal", "info", "--json", "-c", p.config_path).stdout)
    assert info["journal"]["last_seq"] == 3 and info["journal"]["first_seq"] == 1
    assert info["journal"]["segments"][0]["bytes"] > 0
    wait_for(
        lambda: (
            json.loads(nexus_cli("journal", "info", "--json", "-c", p.config_path).stdout)["groups"]["rec"]["lag"] == 0
        ),
        20,
        message="lag 0",
    )

    result = nexus_cli("journal", "replay", "--group", "rec", "--from", "2", "-c", p.config_path)
    assert result.returncode == 0, result.stderr
    assert "replaying from seq 2" in result.stdout
    wait_for(lambda: len(read_handled(str(out))) == 5, 20, message="2 events replayed")
    replayed = [row for row in read_handled(str(out))][3:]
    assert sorted(row[1] for row in replayed) == sorted(ids[1:])
    assert all(row[4] == 1 for row in replayed)  # ctx.redelivered

    bad = nexus_cli("journal", "replay", "--group", "nope", "-c", p.config_path)
    assert bad.returncode != 0 and "unknown group" in bad.stderr


def test_imap_auth_failure_shows_in_status(pipeline, tmp_path):
    dovecot = pytest.importorskip("dovecot")
    if dovecot.BINARY is None:
        pytest.skip("dovecot is not installed (apt-get install dovecot-imapd)")
    with dovecot.Dovecot(users={"alice": "secret"}) as server:
        p, cfg = pipeline(
            producers={
                "mail": {
                    "kind": "imap",
                    "host": server.host,
                    "port": server.port,
                    "ssl": False,
                    "username": "alice",
                    "password": "pw-zX81q-not-it",
                    "reconnect_max": "2s",
                }
            },
            workers={"rec": recorder_group(tmp_path / "out")},
        )

        def mailbox_state():
            proc = {x["name"]: x for x in p.processes()}["mail"]
            return proc.get("detail", {}).get("mailboxes", {}).get("INBOX", {}).get("state")

        wait_for(lambda: mailbox_state() == "auth_failed", 30, message="auth failure in status")
        # the state cycles (auth_failed, then a slow retry): the table shows it when it is there
        wait_for(
            lambda: "INBOX: auth_failed" in nexus_cli("status", "-c", p.config_path).stdout,
            30,
            message="auth failure in the status table",
        )
        proc = {x["name"]: x for x in p.processes()}["mail"]
        assert proc["state"] == "running" and proc["restarts"] == 0  # not a crash loop
        assert "pw-zX81q" not in p.output()  # the password is never logged
