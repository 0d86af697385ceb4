"""Fault tests of issue 10's input edges (#6 sequence spoofing, #12 control characters
and trailing newlines, #16 a damaged cursor file): real launched pipelines, a raw
DEALER as the attacker, `nexus tail` as a real subprocess.

Each test prints a `FAULT-REPORT` line (run pytest with -s to see them).
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import msgspec
import pytest
import zmq
from conftest import recorder_group
from recorder import read_handled
from test_faults import report

from nexus import Producer, RejectedError, config, new_id
from nexus.router.journal import Journal, entry_decoder
from nexus.testing import wait_for

pytestmark = pytest.mark.system

RAW_CONTROLS = re.compile("[\x00-\x08\x0b-\x1f\x7f-\x9f]")  # newline and tab aside


def raw_event(type_: str = "test.item", payload=None, source: str = "raw", **fields) -> dict:
    return {
        "type": type_,
        "source": source,
        "payload": {} if payload is None else payload,
        "id": new_id(),
        "time": time.time(),
        **fields,
    }


def request(sock: zmq.Socket, message: dict, timeout: float = 10.0) -> dict:
    sock.send(msgspec.msgpack.encode(message))
    assert sock.poll(int(timeout * 1000)), "no reply from the router's confirm socket"
    return msgspec.msgpack.decode(sock.recv())


def categories(reply: dict) -> dict[int, str]:
    return {seq: reason.split(": ", 1)[0] for seq, reason, _ in reply.get("nacks", [])}


class Dealer:
    """A bare confirm-mode client (what any process that can reach the endpoint has)."""

    def __init__(self, endpoint: str):
        self.ctx = zmq.Context()
        self.sock = self.ctx.socket(zmq.DEALER)
        self.sock.setsockopt(zmq.LINGER, 0)
        self.sock.connect(endpoint)

    def close(self) -> None:
        self.sock.close(0)
        self.ctx.term()


def producers_in_journal(data_dir: Path) -> dict[str, int]:
    """Producer id -> highest seq, read from a copy of the live journal (an attacker
    who can read the data dir, or a tail of the events, learns them the same way)."""
    copy = data_dir.parent / f"journal-copy-{time.monotonic_ns()}"
    shutil.copytree(data_dir / "journal", copy)
    try:
        journal = Journal(str(copy))
        journal.open()
        seen: dict[str, int] = {}
        for _, body in journal.iter_all():
            e = entry_decoder.decode(body)
            if e.producer:
                seen[e.producer] = max(seen.get(e.producer, 0), e.pseq)
        journal.close()
        return seen
    finally:
        shutil.rmtree(copy)


def handled_rows(out: Path) -> list[tuple]:
    return read_handled(str(out)) if out.exists() else []


def delivery_figures(out: Path, acked: list[str], timeout: float) -> dict:
    """Wait (bounded) for every ACKed id, then count: delivered, lost, duplicates split
    by whether the second handling carried ctx.redelivered."""
    want = set(acked)
    try:
        wait_for(
            lambda: want <= {r[1] for r in handled_rows(out)}, timeout, 0.1, f"all {len(want)} ACKed events handled"
        )
    except (AssertionError, TimeoutError):
        pass  # figures first, the assertion after
    rows = handled_rows(out)
    seen: Counter = Counter()
    flagged = unflagged = 0
    for _, event_id, _, _, redelivered, _ in rows:
        if seen[event_id]:
            flagged += redelivered
            unflagged += not redelivered
        seen[event_id] += 1
    return {
        "delivered": len(want & set(seen)),
        "lost": len(want - set(seen)),
        "dup_flagged": flagged,
        "dup_unflagged": unflagged,
    }


# -- #6 sequence spoofing --------------------------------------------------------------
def test_spoofed_floor_and_seq_lose_no_acked_event(tmp_path, config_factory, launched):
    out = tmp_path / "out"
    path = config_factory(workers={"rec": recorder_group(out)})
    cfg = config.load(path)
    p = launched(path)
    attacker = Dealer(cfg.confirm)
    try:
        with Producer(cfg.confirm, source="victim", ack_timeout=1.0) as victim:
            acked = [victim.send("test.item", {"i": i}, key=f"k{i % 8}") for i in range(10)]
            victim.flush(60)
            [(victim_id, high)] = producers_in_journal(Path(cfg.data_dir)).items()
            assert high == 10
            # the measured attack: an empty batch under the victim's id, floor 10**12 ...
            empty = request(attacker.sock, {"events": [], "producer": victim_id, "seq": high + 1, "floor": 10**12})
            # ... and its variant with an event, whose own first seq vouches for the floor
            spoof = raw_event("test.spoof", source="attacker")
            jump = request(attacker.sock, {"events": [spoof], "producer": victim_id, "seq": 10**12, "floor": 10**12})
            t0 = time.monotonic()
            acked += [victim.send("test.item", {"i": i}, key=f"k{i % 8}") for i in range(10, 110)]
            victim.flush(60)
        figures = delivery_figures(out, acked, 30)
        recover_s = round(time.monotonic() - t0, 2)
        status = p.router_status() or {}
        gaps = status.get("router", {}).get("rejected_by_reason", {}).get("sequence_gap", 0)
        report(
            "sequence_spoofing",
            sent=110,
            acked=len(acked),
            delivered_rec=figures["delivered"],
            lost=figures["lost"],
            dup_flagged=figures["dup_flagged"],
            dup_unflagged=figures["dup_unflagged"],
            recover_s=recover_s,
            gap_nacks=gaps,
            empty_reply_ack=empty.get("ack", 0),
            spoof_reply_ack=jump.get("ack", 0),
        )
        assert figures["lost"] == 0 and figures["delivered"] == 110
        assert empty.get("ack", 0) <= high and "nacks" not in empty  # an empty batch moves nothing
        assert jump.get("ack", 0) == high and categories(jump) == {10**12: "sequence_gap"}
        assert gaps >= 1
        assert spoof["id"] not in {r[1] for r in handled_rows(out)}  # never journaled
    finally:
        attacker.close()


def test_router_restart_after_nacked_events_renumbers_and_loses_nothing(tmp_path, config_factory, launched):
    """Why `floor` existed, now without trusting it: the producer's last events before a
    router SIGKILL were NACKed (not journaled), so the restarted router's `high` lags the
    producer. The router answers sequence_gap; the SDK renumbers and nothing is lost."""
    out = tmp_path / "out"
    path = config_factory(workers={"rec": recorder_group(out)})
    cfg = config.load(path)
    p = launched(path)
    with Producer(cfg.confirm, source="tailnack", ack_timeout=1.0) as producer:
        acked = [producer.send("test.item", {"i": i}, key=f"k{i % 8}") for i in range(50)]
        producer.flush(60)
        for i in range(5):  # unknown types: NACKed, settled, not journaled (a type with
            producer.send("nocontract.item", {"i": i})  # no contract: the SDK cannot refuse it first)
        with pytest.raises(RejectedError):
            producer.flush(60)
        router = {x["name"]: x for x in p.processes()}["router"]
        os.kill(router["pid"], signal.SIGKILL)
        wait_for(
            lambda: (
                {x["name"]: x for x in p.processes()}["router"]["pid"] not in (None, router["pid"])
                and {x["name"]: x for x in p.processes()}["router"]["state"] == "running"
            ),
            30,
            0.1,
            "router restarted",
        )
        t0 = time.monotonic()
        acked += [producer.send("test.item", {"i": i}, key=f"k{i % 8}") for i in range(50, 150)]
        producer.flush(60)
        renumbered = producer._outbox.renumbered
    figures = delivery_figures(out, acked, 60)
    report(
        "restart_after_nacked_tail",
        sent=150,
        acked=len(acked),
        nacked=5,
        delivered_rec=figures["delivered"],
        lost=figures["lost"],
        dup_flagged=figures["dup_flagged"],
        dup_unflagged=figures["dup_unflagged"],
        recover_s=round(time.monotonic() - t0, 2),
        renumbered=renumbered,
    )
    assert figures["lost"] == 0 and figures["delivered"] == 150
    assert renumbered == 1


# -- #12 input edges ---------------------------------------------------------------------
def test_control_characters_are_refused_and_every_output_is_escaped(tmp_path, config_factory, launched):
    out = tmp_path / "out"
    console = {"handler": "workers.console:handle", "subscribe": ["test.*"], "start": "earliest"}
    path = config_factory(workers={"rec": recorder_group(out), "console": console})
    cfg = config.load(path)
    p = launched(path)
    p.wait_members("console", 1)
    tail_out = tmp_path / "tail.out"
    with open(tail_out, "wb") as f:
        tail = subprocess.Popen(
            [sys.executable, "-m", "nexus", "tail", "-c", str(path), "test.*", "--count", "1", "--seconds", "60"],
            stdout=f,
            stderr=subprocess.STDOUT,
        )
    dealer = Dealer(cfg.confirm)
    try:
        wait_for(
            lambda: (p.router_status() or {}).get("router", {}).get("tail_subscribers", 0) >= 1,
            30,
            0.1,
            "nexus tail subscribed",
        )
        hostile = "\x1b[31mred\x1b[0m\nFORGED 00:00:00 line\x9b2J\x7f"
        events = [
            raw_event("test.x\n"),  # 1: `$` matched before the newline
            raw_event(source="evil\x1b[2J"),  # 2: ESC in source
            raw_event(source="del\x7f"),  # 3: DEL in source
            raw_event(key="k\nforged"),  # 4: newline in key
            raw_event(key="k\x9b"),  # 5: C1 (CSI) in key
            raw_event(correlation_id="c\x00"),  # 6: NUL in correlation_id
            raw_event(payload={"text": hostile, hostile: 1}, source="fine", key="k1"),  # 7: accepted
        ]
        reply = request(dealer.sock, {"events": events, "producer": "edges", "seq": 1, "floor": 1})
        reasons = {seq: reason for seq, reason, _ in reply.get("nacks", [])}
        refused = sum(1 for s in range(1, 7) if reasons.get(s, "").startswith("malformed: "))
        fields_named = all(
            f"$.{field}`" in reasons.get(s, "")
            for s, field in [(2, "source"), (3, "source"), (4, "key"), (5, "key"), (6, "correlation_id")]
        )
        accepted = reply.get("ack") == 7 and 7 not in reasons
        delivered = False
        if accepted:
            try:
                wait_for(lambda: events[6]["id"] in {r[1] for r in handled_rows(out)}, 30, 0.1, "handled")
                wait_for(lambda: "from fine" in p.output(), 30, 0.1, "console worker printed the event")
                tail.wait(60)
                delivered = True
            except (AssertionError, TimeoutError, subprocess.TimeoutExpired):
                pass
        launch_out = p.output()
        tail_text = tail_out.read_bytes().decode(errors="replace")
        console_line = next((line for line in launch_out.splitlines() if "from fine" in line), "")
        report(
            "input_edges",
            sent=7,
            acked=reply.get("ack", 0) - len(reasons),
            refused=refused,
            delivered_rec=int(delivered),
            lost=int(accepted and not delivered),
            dup_flagged=0,
            dup_unflagged=0,
            raw_controls_console=len(RAW_CONTROLS.findall(launch_out)),
            raw_controls_tail=len(RAW_CONTROLS.findall(tail_text)),
        )
        assert refused == 6 and fields_named, reasons
        assert accepted and delivered
        assert RAW_CONTROLS.search(launch_out) is None and RAW_CONTROLS.search(tail_text) is None
        assert "FORGED" not in launch_out.split("\n")[0] and not any(
            line.startswith("FORGED") for line in (launch_out + tail_text).splitlines()
        )
        # escaped, readable: JSON escapes for C0 in the payload summary, repr escapes otherwise
        assert "\\u001b[31mred" in console_line and "\\x9b2J" in console_line and "\\x7f" in console_line
        assert "\\u001b[31mred" in tail_text and "\\u009b2J" in tail_text
    finally:
        dealer.close()
        if tail.poll() is None:
            tail.kill()
            tail.wait(10)


def test_console_log_format_escapes_control_characters(tmp_path):
    code = (
        "import structlog; from nexus.common import logs; logs.configure(); "
        "structlog.get_logger('t').warning('evt\\x1b[2J', source='a\\nFORGED line', key='\\x9b1m')"
    )
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, timeout=60)
    err = run.stderr.decode()
    assert run.returncode == 0, err
    assert RAW_CONTROLS.search(err) is None and "\nFORGED" not in err
    assert "evt\\x1b[2J" in err and "x9b1m" in err


# -- #16 a damaged cursor file ----------------------------------------------------------------
@pytest.mark.parametrize("damage", ["file", "file_and_previous"])
def test_damaged_cursor_file_resumes_without_skipping_the_backlog(tmp_path, config_factory, launched, damage):
    out = tmp_path / "out"
    path = config_factory(workers={"late": recorder_group(out, start="latest")})
    cfg = config.load(path)
    p = launched(path)
    p.wait_members("late", 1)
    with Producer(cfg.confirm, source="backlog", ack_timeout=1.0) as producer:
        handled = [producer.send("test.item", {"i": i}, key=f"k{i % 16}") for i in range(500)]
        producer.flush(60)
        delivery_figures(out, handled, 60)
        assert p.control("scale", group="late", n=0) is not None  # no members: a backlog builds
        wait_for(
            lambda: not (p.router_status() or {"groups": {"late": {"members": [1]}}})["groups"]["late"]["members"],
            30,
            0.1,
            "the member left",
        )
        backlog = [producer.send("test.item", {"i": i}, key=f"k{i % 16}") for i in range(500, 1500)]
        producer.flush(60)
    p.stop()
    cursor_file = Path(cfg.data_dir) / "cursors.msgpack"
    targets = [cursor_file] + ([cursor_file.with_name("cursors.msgpack.prev")] if damage == "file_and_previous" else [])
    for target in targets:
        data = bytearray(target.read_bytes())
        data[len(data) // 2] ^= 0x5A  # a flipped byte and a lost last byte
        target.write_bytes(bytes(data[:-1]))
    t0 = time.monotonic()
    p2 = launched(path)
    figures = delivery_figures(out, handled + backlog, 60)
    recover_s = round(time.monotonic() - t0, 2)
    status = p2.router_status() or {}
    damaged = status.get("router", {}).get("cursor_file_damaged")
    report(
        f"damaged_cursor_file_{damage}",
        sent=1500,
        acked=len(handled) + len(backlog),
        backlog=len(backlog),
        delivered_late=figures["delivered"],
        lost=figures["lost"],
        dup_flagged=figures["dup_flagged"],
        dup_unflagged=figures["dup_unflagged"],
        recover_s=recover_s,
        recovered_from=(damaged or {}).get("recovered_from"),
    )
    assert figures["lost"] == 0 and figures["delivered"] == 1500
    assert damaged and damaged["recovered_from"] == ("previous" if damage == "file" else "nothing")
    assert p2.output().count("state_file_damaged") == 1
    assert os.path.exists(f"{cursor_file}.damaged")
