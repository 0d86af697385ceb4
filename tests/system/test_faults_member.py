"""Fault tests of misbehaving handlers and the member runtime (issue 10: #5, #8, #9, #11,
#14): real launcher, real member processes that crash, hang, leak and emit rejected
follow-ups. Each prints a FAULT-REPORT line (run pytest with -s to see them)."""

from __future__ import annotations

import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import recorder_group
from recorder import read_handled
from test_faults import Sender, report, wait_all_handled

from nexus import Producer, config
from nexus.protocol import transport
from nexus.protocol.wire import DlqRequest, coord_decoder, encoder
from nexus.testing import wait_for

pytestmark = pytest.mark.system


def group(out: Path, handler: str, processes: int = 2, **extra) -> dict:
    spec = recorder_group(out, processes=processes, **extra)
    spec["handler"] = handler
    return spec


def dead_letters(cfg, group_name: str) -> list[dict]:
    raw = transport.request(
        transport.zmq.Context.instance(), cfg.coord, encoder.encode(DlqRequest(action="list", group=group_name)), 3.0
    )
    return [] if raw is None else coord_decoder.decode(raw).data.get("dead_letters", [])


def send_poison(cfg, key: str = "bad") -> str:
    with Producer(cfg.confirm, source="poison") as producer:
        event_id = producer.send("test.item", {"poison": True}, key=key)
        producer.flush(30)
    return event_id


def duplicates(out: Path) -> tuple[int, int]:
    """(flagged, unflagged) extra handlings of an id: of an id's n handlings one may be
    unflagged (the first); the others must carry ctx.redelivered (or attempt > 1)."""
    rows: dict[str, list[bool]] = {}
    for _member, event_id, _seq, _p, redelivered, attempt in read_handled(str(out)):
        rows.setdefault(event_id, []).append(bool(redelivered or attempt > 1))
    flagged = unflagged = 0
    for marks in rows.values():
        plain = marks.count(False)
        unflagged += max(0, plain - 1)
        flagged += len(marks) - 1 - max(0, plain - 1)
    return flagged, unflagged


# -- #9: a handler that kills its process on one event --------------------------------------
@pytest.mark.parametrize(
    "handler,how", [("misbehave:exits", "exit code 13"), ("misbehave:segfaults", "signal SIGSEGV")]
)
def test_poison_event_that_kills_the_member_is_dead_lettered(tmp_path, config_factory, launched, handler, how):
    out = tmp_path / "rec"
    path = config_factory(workers={"rec": group(out, handler, processes=2)})
    cfg = config.load(path)
    p = launched(path)
    sender = Sender(cfg.confirm, 3_000, chunk=100, pace=0.01)
    sender.start()
    wait_for(lambda: len(sender.acked) >= 500, 60, message="500 acked")
    t0 = time.monotonic()
    poison_id = send_poison(cfg)
    sender.join(120)
    assert sender.error is None and len(sender.acked) == 3_000
    handled = wait_all_handled(out, sender.acked, 120)
    rows = wait_for(
        lambda: [r for r in dead_letters(cfg, "rec") if r["event_id"] == poison_id],
        90,
        0.2,
        "the poison event dead-lettered",
    )
    recover_s = time.monotonic() - t0
    (row,) = rows
    assert row["error_type"] == "ProcessCrashed" and how in row["error"], row
    status = p.router_status()["groups"]["rec"]
    wait_for(lambda: p.router_status()["groups"]["rec"]["unassigned"] == 0, 30, message="all partitions assigned")
    procs = p.processes()
    crashes = p.output().count("member_crashed")
    flagged, unflagged = duplicates(out)
    report(
        f"poison_{handler.split(':')[1]}",
        sent=3_001,
        acked=len(sender.acked) + 1,
        delivered_rec=len(set(handled) & set(sender.acked)),
        lost=len(set(sender.acked) - set(handled)),
        dead_lettered=len(rows),
        crashes=crashes,
        restarts=sum(x["restarts"] for x in procs),
        dup_flagged=flagged,
        dup_unflagged=unflagged,
        recover_s=round(recover_s, 1),
    )
    assert set(sender.acked) <= set(handled)
    assert poison_id not in handled
    assert crashes == 3  # max_crashes, then dead-lettered
    assert all(x["state"] != "failed" for x in procs), procs
    assert any(how in x.get("last_exit", "") for x in procs), procs  # status says why
    assert unflagged == 0
    assert status["dead_letters"] >= 1
    log = p.output()
    assert re.search(r"member_crashed.*seqs=\[\d+\]", log), "the crash names the event"


# -- #8: a handler that blocks forever --------------------------------------------------------
def test_stuck_sync_handler_restarts_its_member_and_the_rest_flows(tmp_path, config_factory, launched):
    out = tmp_path / "rec"
    path = config_factory(
        workers={
            "rec": group(
                out, "misbehave:blocks", processes=2, handler_timeout="1s", retry={"attempts": 2, "backoff": ["0.1s"]}
            )
        }
    )
    cfg = config.load(path)
    p = launched(path)
    sender = Sender(cfg.confirm, 2_000, chunk=100, pace=0.01)
    sender.start()
    wait_for(lambda: len(sender.acked) >= 300, 60, message="300 acked")
    t0 = time.monotonic()
    poison_id = send_poison(cfg)
    sender.join(120)
    assert sender.error is None and len(sender.acked) == 2_000
    handled = wait_all_handled(out, sender.acked, 120)
    (row,) = wait_for(
        lambda: [r for r in dead_letters(cfg, "rec") if r["event_id"] == poison_id],
        90,
        0.2,
        "the stuck event dead-lettered",
    )
    recover_s = time.monotonic() - t0
    log = p.output()
    timeouts = log.count("handler_timed_out")
    flagged, unflagged = duplicates(out)
    report(
        "stuck_sync_handler",
        sent=2_001,
        acked=len(sender.acked) + 1,
        delivered_rec=len(set(handled) & set(sender.acked)),
        lost=len(set(sender.acked) - set(handled)),
        timeouts=timeouts,
        dead_lettered=1,
        dup_flagged=flagged,
        dup_unflagged=unflagged,
        recover_s=round(recover_s, 1),
    )
    assert row["error_type"] == "HandlerTimeout" and "exit code 7" in row["error"], row
    assert timeouts == 2  # retry.attempts timeouts, then the DLQ
    assert set(sender.acked) <= set(handled) and unflagged == 0
    assert all(x["state"] != "failed" for x in p.processes())


def test_stuck_async_handler_is_cancelled_and_retried_then_dead_lettered(tmp_path, engine_config, launched):
    out = tmp_path / "rec"
    path = engine_config(
        workers={
            "rec": group(
                out,
                "misbehave:blocks_async",
                processes=1,
                handler_timeout="1s",
                retry={"attempts": 2, "backoff": ["0.1s"]},
            )
        }
    )
    cfg = config.load(path)
    p = launched(path)
    sender = Sender(cfg.confirm, 1_000, chunk=100)
    sender.start()
    poison_id = send_poison(cfg)
    sender.join(120)
    assert sender.error is None
    handled = wait_all_handled(out, sender.acked, 60)
    (row,) = wait_for(
        lambda: [r for r in dead_letters(cfg, "rec") if r["event_id"] == poison_id],
        60,
        0.2,
        "the stuck event dead-lettered",
    )
    restarts = sum(x["restarts"] for x in p.processes())
    report(
        "stuck_async_handler",
        sent=1_001,
        acked=len(sender.acked) + 1,
        delivered_rec=len(handled),
        lost=len(set(sender.acked) - set(handled)),
        dead_lettered=1,
        restarts=restarts,
    )
    assert row["error_type"] == "TimeoutError" and row["attempts"] == 2
    assert restarts == 0  # cancelled, the member lives on


def test_stop_with_a_stuck_handler_ends_within_shutdown_timeout(tmp_path, config_factory, launched):
    out = tmp_path / "rec"
    path = config_factory(
        shutdown_timeout="6s", workers={"rec": group(out, "misbehave:blocks", processes=1, handler_timeout="5m")}
    )
    cfg = config.load(path)
    p = launched(path)
    with Producer(cfg.confirm, source="fault") as producer:
        ids = [producer.send("test.item", {"i": i}, key=f"k{i}") for i in range(100)]
        producer.flush(30)
    wait_all_handled(out, ids, 60)
    send_poison(cfg)
    # the member is inside the stuck call once its heartbeats show the event queued
    wait_for(
        lambda: (p.router_status()["groups"]["rec"]["members"] or [{}])[0].get("queued") == 1, 30, 0.1, "the stuck call"
    )
    t0 = time.monotonic()
    p.proc.send_signal(signal.SIGTERM)
    code = p.proc.wait(60)
    stop_s = time.monotonic() - t0
    log = p.output()
    report(
        "stop_with_stuck_handler",
        sent=101,
        acked=101,
        delivered_rec=len(ids),
        stop_s=round(stop_s, 1),
        killed=log.count("process_killed"),
    )
    assert code == 0
    assert "process_killed" not in log, "the launcher had to kill the member"
    assert re.search(r"handler_timed_out.*stopping=True", log)
    assert stop_s < 6 + 3


# -- #11: member hygiene ----------------------------------------------------------------------
def test_leaking_member_is_recycled_and_nothing_is_lost(tmp_path, config_factory, launched):
    out = tmp_path / "rec"
    max_rss = 110 * 2**20
    path = config_factory(
        workers={"rec": group(out, "misbehave:leaks", processes=1, max_rss=max_rss, options={"leak_bytes": 250_000})}
    )
    cfg = config.load(path)
    p = launched(path)
    sender = Sender(cfg.confirm, 1_500, chunk=50, pace=0.05)  # 375 MB leaked in all without a limit
    peak = 0
    sender.start()
    while sender.is_alive():
        sender.join(0.2)
        status = p.router_status(1.0) or {"groups": {}}
        for m in status["groups"].get("rec", {}).get("members", []):
            peak = max(peak, m.get("rss", 0))
    assert sender.error is None and len(sender.acked) == 1_500
    handled = wait_all_handled(out, sender.acked, 120)
    log = p.output()
    recycles = log.count("process_recycled")
    peak = max([peak] + [int(mb) << 20 for mb in re.findall(r"rss (\d+) MiB over max_rss", log)])
    flagged, unflagged = duplicates(out)
    report(
        "leak_recycle",
        sent=1_500,
        acked=len(sender.acked),
        delivered_rec=len(handled),
        lost=len(set(sender.acked) - set(handled)),
        recycles=recycles,
        peak_rss_mb=peak >> 20,
        max_rss_mb=max_rss >> 20,
        dup_flagged=flagged,
        dup_unflagged=unflagged,
    )
    assert recycles >= 2
    assert set(sender.acked) <= set(handled) and unflagged == 0
    assert peak < max_rss + 32 * 2**20  # bounded: one check (64 events) of leak
    assert "crash_loop" not in log and all(x["state"] != "failed" for x in p.processes())


def test_max_events_recycles_gracefully(tmp_path, config_factory, launched):
    out = tmp_path / "rec"
    path = config_factory(workers={"rec": recorder_group(out, processes=1, max_events=400)})
    cfg = config.load(path)
    p = launched(path)
    sender = Sender(cfg.confirm, 2_000, chunk=100, pace=0.2)
    sender.start()
    sender.join(120)
    assert sender.error is None
    handled = wait_all_handled(out, sender.acked, 120)
    recycles = p.output().count("process_recycled")
    flagged, unflagged = duplicates(out)
    report(
        "max_events_recycle",
        sent=2_000,
        acked=len(sender.acked),
        delivered_rec=len(handled),
        lost=len(set(sender.acked) - set(handled)),
        recycles=recycles,
        dup_flagged=flagged,
        dup_unflagged=unflagged,
    )
    assert recycles >= 2 and set(sender.acked) <= set(handled)
    assert flagged == 0 and unflagged == 0  # drained and acked: no redelivery


# -- #14: a follow-up event the router rejects ----------------------------------------------
def test_rejected_follow_up_fails_its_handler_call_not_the_acks(tmp_path, config_factory, launched):
    out, follow = tmp_path / "fwd", tmp_path / "follow"
    path = config_factory(
        workers={
            "fwd": group(
                out,
                "misbehave:forwards",
                processes=1,
                subscribe=["test.item"],
                retry={"attempts": 2, "backoff": ["0.1s"]},
            ),
            "follow": recorder_group(follow, processes=1, subscribe=["test.follow"]),
        }
    )
    cfg = config.load(path)
    p = launched(path)
    sender = Sender(cfg.confirm, 1_000, chunk=100, pace=0.01)
    sender.start()
    wait_for(lambda: len(sender.acked) >= 100, 60, message="100 acked")
    poison_id = send_poison(cfg)
    sender.join(120)
    assert sender.error is None
    handled = wait_all_handled(out, sender.acked, 60)
    (row,) = wait_for(
        lambda: [r for r in dead_letters(cfg, "fwd") if r["event_id"] == poison_id],
        60,
        0.2,
        "the cause of the rejected follow-up dead-lettered",
    )
    followed = wait_for(
        lambda: len(read_handled(str(follow))) >= 1_000 and read_handled(str(follow)),
        60,
        0.2,
        "1000 follow-ups handled",
    )
    wait_for(lambda: p.router_status()["groups"]["fwd"]["lag"] == 0, 30, 0.2, "fwd's cursor at the end")
    flagged, unflagged = duplicates(out)
    report(
        "emit_nacked",
        sent=1_001,
        acked=len(sender.acked) + 1,
        delivered_fwd=len(set(handled) & set(sender.acked)),
        delivered_follow=len(followed),
        lost=len(set(sender.acked) - set(handled)),
        dead_lettered=1,
        lag_fwd=0,
        dup_flagged=flagged,
        dup_unflagged=unflagged,
    )
    assert row["error_type"] == "RejectedError" and "unknown event type" in row["error"], row
    assert unflagged == 0


# -- #5: dead letters from two members while the database is locked ---------------------------
def test_dead_letters_are_never_lost_when_the_store_is_busy(tmp_path, config_factory, launched):
    out = tmp_path / "rec"
    fixed = tmp_path / "fixed"
    path = config_factory(
        workers={
            "rec": group(out, "recorder:poisonable", processes=2, retry={"attempts": 1}, options={"fixed": str(fixed)})
        }
    )
    cfg = config.load(path)
    p = launched(path)
    db = Path(cfg.data_dir) / "dlq.sqlite3"
    # someone else holds the write lock for 11 s (an operator's sqlite3 shell, a backup tool):
    # longer than SQLite's busy timeout was (10 s), which lost a dead letter then
    locker = subprocess.Popen(
        [
            sys.executable,
            "-c",
            (
                "import sqlite3, sys, time\n"
                f"db = sqlite3.connect({str(db)!r}, isolation_level=None)\n"
                "db.execute('BEGIN IMMEDIATE'); print('locked', flush=True); time.sleep(11); db.execute('COMMIT')\n"
            ),
        ],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert locker.stdout.readline().strip() == "locked"
        flush_times: list[float] = []
        ids, bad = [], []
        with Producer(cfg.confirm, source="fault") as producer:
            for i in range(1_000):
                poison = i % 5 == 0
                event_id = producer.send("test.item", {"i": i, "poison": poison}, key=f"k{i % 64}")
                (bad if poison else ids).append(event_id)
                if i % 50 == 49:
                    t = time.monotonic()
                    producer.flush(60)
                    flush_times.append(time.monotonic() - t)
        handled = wait_all_handled(out, ids, 60)
        locker.wait(30)
        rows = wait_for(
            lambda: (r := dead_letters(cfg, "rec")) and len(r) >= len(bad) and r,
            60,
            0.2,
            f"{len(bad)} dead letters stored",
        )
    finally:
        if locker.poll() is None:
            locker.kill()
            locker.wait()
    stored = {r["event_id"] for r in rows}
    busy = p.output().count("dead_letter_store_busy")
    report(
        "dlq_busy",
        sent=1_000,
        acked=1_000,
        delivered_rec=len(set(handled) & set(ids)),
        dead_lettered=len(stored & set(bad)),
        lost=len(set(ids) - set(handled)) + len(set(bad) - stored),
        max_flush_s=round(max(flush_times), 2),
        busy_episodes=busy,
    )
    assert stored == set(bad) and set(ids) <= set(handled)
    assert all(r["failures"] == 1 for r in rows), "a resend counted as a second failure"
    assert max(flush_times) < 3.0, "the router loop stalled on SQLite"
    wait_for(lambda: p.router_status()["groups"]["rec"]["lag"] == 0, 30, 0.2, "the cursor past the dead letters")
