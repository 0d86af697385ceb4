"""Fault tests of the delivery guarantees: real processes, killed for real.

Each test prints a `FAULT-REPORT` line with its counts (run pytest with -s to see them).
"""

from __future__ import annotations

import os
import random
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections import Counter
from pathlib import Path

import pytest
import yaml
from conftest import recorder_group
from recorder import read_handled, tally

from nexus import Producer, config
from nexus.protocol.events import decode_wire_event
from nexus.router.journal import Journal, entry_decoder
from nexus.router.segments import scan
from nexus.testing import wait_for

pytestmark = pytest.mark.system


def report(name: str, **counts) -> None:
    print(f"\nFAULT-REPORT {name}: " + " ".join(f"{k}={v}" for k, v in counts.items()), flush=True)


class Sender(threading.Thread):
    """Sends `total` confirmed events in flushes of `chunk`; keeps the ACKed ids."""

    def __init__(
        self, endpoint: str, total: int, chunk: int = 200, source: str = "fault", key_count: int = 64, pace: float = 0.0
    ):
        super().__init__(daemon=True)
        self.endpoint, self.total, self.chunk, self.source = endpoint, total, chunk, source
        self.key_count, self.pace = key_count, pace
        self.acked: list[str] = []
        self.error: BaseException | None = None

    def run(self) -> None:
        try:
            with Producer(self.endpoint, source=self.source, ack_timeout=1.0) as producer:
                pending: list[str] = []
                for i in range(self.total):
                    pending.append(producer.send("test.item", {"i": i}, key=f"k{i % self.key_count}"))
                    if len(pending) >= self.chunk:
                        producer.flush(120)
                        self.acked += pending
                        pending = []
                        if self.pace:
                            time.sleep(self.pace)  # pacing the load, not synchronizing
                producer.flush(120)
                self.acked += pending
        except BaseException as exc:
            self.error = exc


def handled_counter(out: Path) -> Counter:
    return Counter(row[1] for row in read_handled(str(out)))


def duplicates(out: Path) -> dict:
    """Handlings beyond the first per event id; flagged when the extra handlings carry
    ctx.redelivered (an event handled n times needs n-1 flagged handlings)."""
    handled, flagged, unflagged = tally(read_handled(str(out)))
    return {"delivered": len(handled), "dup_flagged": flagged, "dup_unflagged": unflagged}


def wait_all_handled(out: Path, ids: list[str], timeout: float = 120) -> Counter:
    want = set(ids)
    wait_for(lambda: want <= set(handled_counter(out)), timeout, 0.1, f"all {len(want)} events handled in {out.name}")
    return handled_counter(out)


def verify_journal(data_dir: Path, acked: list[str]) -> dict:
    """Open a copy of the journal: no corruption, seqs contiguous, every ACKed id present."""
    copy = data_dir.parent / "journal-copy"
    shutil.copytree(data_dir / "journal", copy)
    try:
        journal = Journal(str(copy))
        recovery = journal.open()
        seqs, ids = [], set()
        for seq, body in journal.iter_all():
            seqs.append(seq)
            ids.add(decode_wire_event(entry_decoder.decode(body).event).id)
        journal.close()
    finally:
        shutil.rmtree(copy)
    assert seqs == list(range(1, len(seqs) + 1)), "journal seqs are not contiguous"
    assert set(acked) <= ids, f"{len(set(acked) - ids)} ACKed events missing from the journal"
    return {"records": len(seqs), "truncated_bytes": recovery.truncated_bytes}


def test_worker_kill_storm(tmp_path, config_factory, launched):
    out_a, out_b = tmp_path / "a", tmp_path / "b"
    path = config_factory(workers={"a": recorder_group(out_a, processes=2), "b": recorder_group(out_b, processes=2)})
    cfg = config.load(path)
    p = launched(path)
    sender = Sender(cfg.confirm, 20_000, pace=0.1)  # ~10 s of traffic
    sender.start()
    rng = random.Random(1234)
    kills = 0
    next_kill = time.monotonic() + 1.0
    while sender.is_alive():
        sender.join(max(0.0, next_kill - time.monotonic()))
        if not sender.is_alive():
            break
        victims = [x for x in p.processes() if x["role"] == "worker" and x["state"] == "running" and x["pid"]]
        if victims:
            os.kill(rng.choice(victims)["pid"], signal.SIGKILL)
            kills += 1
        next_kill += 1.0
    assert sender.error is None, sender.error
    assert len(sender.acked) == 20_000
    a = wait_all_handled(out_a, sender.acked, 180)
    b = wait_all_handled(out_b, sender.acked, 180)
    restarts = sum(x["restarts"] for x in p.processes())
    dup_a = sum(v - 1 for v in a.values())
    dup_b = sum(v - 1 for v in b.values())
    d_a, d_b = duplicates(out_a), duplicates(out_b)
    report(
        "worker_kill_storm",
        sent=20_000,
        acked=len(sender.acked),
        kills=kills,
        restarts=restarts,
        delivered_a=len(a),
        delivered_b=len(b),
        lost_a=len(set(sender.acked) - set(a)),
        lost_b=len(set(sender.acked) - set(b)),
        duplicates_a=dup_a,
        duplicates_b=dup_b,
        dup_flagged=d_a["dup_flagged"] + d_b["dup_flagged"],
        dup_unflagged=d_a["dup_unflagged"] + d_b["dup_unflagged"],
    )
    assert kills >= 3 and restarts >= 3
    assert d_a["dup_unflagged"] == 0 and d_b["dup_unflagged"] == 0
    assert set(a) == set(sender.acked) and set(b) == set(sender.acked)


def test_router_kill(tmp_path, config_factory, launched):
    out_a, out_b = tmp_path / "a", tmp_path / "b"
    path = config_factory(workers={"a": recorder_group(out_a, processes=1), "b": recorder_group(out_b, processes=1)})
    cfg = config.load(path)
    p = launched(path)
    senders = [Sender(cfg.confirm, 5_000, chunk=100, source=f"s{i}", pace=0.05) for i in range(2)]
    for s in senders:
        s.start()
    kills = 0
    for _ in range(3):
        router = {x["name"]: x for x in p.processes()}["router"]
        wait_for(
            lambda: sum(len(s.acked) for s in senders) >= (kills + 1) * 2000 or not any(s.is_alive() for s in senders),
            120,
            message="progress before the kill",
        )
        os.kill(router["pid"], signal.SIGKILL)
        kills += 1
        wait_for(
            lambda: (
                {x["name"]: x for x in p.processes()}["router"]["pid"] not in (None, router["pid"])
                and {x["name"]: x for x in p.processes()}["router"]["state"] == "running"
            ),
            30,
            message="router restarted",
        )
    for s in senders:
        s.join(300)
        assert not s.is_alive() and s.error is None, s.error
    acked = [i for s in senders for i in s.acked]
    a = wait_all_handled(out_a, acked, 180)
    b = wait_all_handled(out_b, acked, 180)
    p.stop()
    journal = verify_journal(Path(cfg.data_dir), acked)
    d_a, d_b = duplicates(out_a), duplicates(out_b)
    report(
        "router_kill",
        sent=10_000,
        acked=len(acked),
        router_kills=kills,
        delivered_a=len(set(a) & set(acked)),
        delivered_b=len(set(b) & set(acked)),
        duplicates_a=sum(v - 1 for v in a.values()),
        duplicates_b=sum(v - 1 for v in b.values()),
        dup_flagged=d_a["dup_flagged"] + d_b["dup_flagged"],
        dup_unflagged=d_a["dup_unflagged"] + d_b["dup_unflagged"],
        journal_records=journal["records"],
        journal_truncated_bytes=journal["truncated_bytes"],
    )
    assert len(acked) == 10_000
    # every event handled twice says so the second time (ctx.redelivered)
    assert d_a["dup_unflagged"] == 0 and d_b["dup_unflagged"] == 0


def test_slow_joiner_and_late_group(tmp_path, config_factory, launched):
    out, out_late = tmp_path / "rec", tmp_path / "late"
    path = config_factory(workers={"rec": recorder_group(out, processes=1)})
    cfg = config.load(path)
    p = launched(path)
    sender = Sender(cfg.confirm, 6_000, chunk=100, pace=0.01)
    sender.start()
    wait_for(lambda: len(sender.acked) >= 2000, 60, message="2000 acked")
    # a member started from another terminal joins mid-stream
    joiner = subprocess.Popen(
        [sys.executable, "-m", "nexus", "worker", "rec", "--name", "rec-joiner", "-c", str(path)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        p.wait_members("rec", 2)
        sender.join(120)
        assert sender.error is None and len(sender.acked) == 6_000
        handled = wait_all_handled(out, sender.acked)
        members = Counter(row[0] for row in read_handled(str(out)))
    finally:
        joiner.send_signal(signal.SIGTERM)
        joiner.wait(30)
    p.stop()
    # a group added later with start: earliest sees the whole range
    with open(path) as f:
        raw = yaml.safe_load(f)
    raw["workers"]["late"] = recorder_group(out_late, processes=1)
    path.write_text(yaml.safe_dump(raw))
    launched(path)
    late = wait_all_handled(out_late, sender.acked)
    report(
        "slow_joiner_late_group",
        sent=6_000,
        acked=len(sender.acked),
        handled=len(handled),
        by_member=dict(members),
        duplicates=sum(v - 1 for v in handled.values()),
        late_group=len(late),
        late_duplicates=sum(v - 1 for v in late.values()),
    )
    assert members["rec-joiner"] > 0
    assert set(late) == set(sender.acked)


def test_slow_group_does_not_hold_back_another(tmp_path, config_factory, launched):
    out_slow, out_fast = tmp_path / "slow", tmp_path / "fast"
    path = config_factory(
        workers={
            "slow": recorder_group(out_slow, processes=1, options={"sleep": 0.005}, max_in_flight=200),
            "fast": recorder_group(out_fast, processes=1),
        }
    )
    cfg = config.load(path)
    p = launched(path)
    sender = Sender(cfg.confirm, 3_000, chunk=500)
    sender.start()
    sender.join(120)
    assert sender.error is None
    fast = wait_all_handled(out_fast, sender.acked, 60)
    slow_when_fast_done = len(handled_counter(out_slow))
    status = p.router_status()
    slow_lag = status["groups"]["slow"]["lag"]
    slow = wait_all_handled(out_slow, sender.acked, 180)
    report(
        "slow_group",
        sent=3_000,
        fast_done=len(fast),
        slow_done_when_fast_done=slow_when_fast_done,
        slow_lag_then=slow_lag,
        slow_final=len(slow),
    )
    # the fast group finished while the slow one was still far behind
    assert slow_when_fast_done < 3_000 * 0.5
    assert set(slow) == set(sender.acked)


def test_graceful_restart_under_load(tmp_path, engine_config, launched):
    out = tmp_path / "rec"
    path = engine_config(workers={"rec": recorder_group(out, processes=2)})
    cfg = config.load(path)
    p = launched(path)
    sender = Sender(cfg.confirm, 8_000, chunk=100, pace=0.005)
    sender.start()
    wait_for(lambda: len(sender.acked) >= 3000, 60, message="3000 acked")
    p.proc.send_signal(signal.SIGTERM)  # while events are flowing
    assert p.proc.wait(60) == 0
    p.stop()
    launched(path)  # start again; the sender resends what was not ACKed
    sender.join(180)
    assert sender.error is None and len(sender.acked) == 8_000
    handled = wait_all_handled(out, sender.acked)
    duplicates = sum(v - 1 for v in handled.values())
    report("graceful_restart", sent=8_000, acked=len(sender.acked), handled=len(handled), duplicates=duplicates)
    assert duplicates == 0, "an event acked before the stop was handled again"


def test_corrupt_tail_is_truncated_and_the_rest_served(tmp_path, config_factory, launched):
    out = tmp_path / "rec"
    path = config_factory(workers={})
    cfg = config.load(path)
    p = launched(path)
    with Producer(cfg.confirm, source="tail") as producer:
        ids = [producer.send("test.item", {"i": i}) for i in range(1000)]
    p.stop()
    segment = sorted((Path(cfg.data_dir) / "journal").glob("*.seg"))[-1]
    size = segment.stat().st_size
    # the last record holds the events of the router's last write (a batch record): all
    # of them are lost with it, every event before it is served (seq n is ids[n - 1])
    with open(segment, "rb") as f:
        first = int(segment.name.removesuffix(".seg"))
        records = [r for r in scan(f.fileno(), size, first - 1) if r[0] == "record"]
    torn_first, torn_last = records[-1][2], records[-1][4]
    assert torn_last == 1000 and 1 < torn_first
    os.truncate(segment, size - 7)  # the last record is now torn
    raw = yaml.safe_load(path.read_text())
    raw["workers"] = {"rec": recorder_group(out, processes=1)}
    path.write_text(yaml.safe_dump(raw))
    p2 = launched(path)
    handled = wait_all_handled(out, ids[: torn_first - 1])
    assert "journal_tail_truncated" in p2.output()
    status = p2.router_status()
    report(
        "corrupt_tail",
        written=1000,
        torn=torn_last - torn_first + 1,
        served=len(handled),
        last_seq=status["router"]["seq"],
    )
    assert status["router"]["seq"] == torn_first - 1
    assert not set(ids[torn_first - 1 :]) & set(handled)
