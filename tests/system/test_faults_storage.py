"""Fault tests of storage (issue 10 #2, #3, #4, #17): a damaged journal, a full disk,
catch-up with big events, status with a large backlog. Real processes, real files, a
real full filesystem (a tmpfs the test mounts). Run with -s to see FAULT-REPORT lines.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
from collections import Counter
from pathlib import Path

import pytest
import yaml
from conftest import recorder_group
from recorder import read_handled
from test_faults import Sender, handled_counter, report, wait_all_handled

from nexus import Producer, config
from nexus.errors import ExitCode, PeerError
from nexus.testing import wait_for

pytestmark = pytest.mark.system

MiB = 2**20


# -- helpers -------------------------------------------------------------------------------------
def router_pid(p) -> int:
    return {x["name"]: x for x in p.processes()}["router"]["pid"]


def rss_kb(pid: int) -> tuple[int, int]:
    """(VmRSS, VmHWM) of a process in KiB."""
    fields = {}
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            key, _, value = line.partition(":")
            if key in ("VmRSS", "VmHWM"):
                fields[key] = int(value.split()[0])
    return fields.get("VmRSS", 0), fields.get("VmHWM", 0)


class RssSampler(threading.Thread):
    """Samples a process's RSS every 50 ms (a measurement, not synchronization)."""

    def __init__(self, pid: int):
        super().__init__(daemon=True)
        self.pid, self.peak, self.stop_event = pid, 0, threading.Event()

    def run(self) -> None:
        while not self.stop_event.wait(0.05):
            try:
                self.peak = max(self.peak, rss_kb(self.pid)[0])
            except (FileNotFoundError, ProcessLookupError):
                return

    def stop(self) -> int:
        self.stop_event.set()
        self.join(5)
        return self.peak


def nexus_cli(path, *args) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "nexus", *args, "-c", str(path)], capture_output=True, text=True, timeout=120
    )


def send_big(endpoint: str, count: int, size: int, source: str = "big", keys: int = 32) -> list[str]:
    """`count` confirmed events whose payload is about `size` bytes, over `keys` keys."""
    blob = "x" * size
    ids = []
    with Producer(endpoint, source=source, max_event_bytes=size + 4096, ack_timeout=10.0) as producer:
        for i in range(count):
            ids.append(producer.send("test.big", {"i": i, "blob": blob}, key=f"k{i % keys}"))
            if len(ids) % 200 == 0:
                producer.flush(120)
        producer.flush(120)
    return ids


def dup_counts(out: Path) -> tuple[int, int]:
    """(flagged, unflagged) duplicate handler calls: a repeat carries ctx.redelivered or not."""
    rows = read_handled(str(out))
    seen: Counter = Counter()
    flagged = unflagged = 0
    for _member, event_id, _seq, _p, redelivered, _attempt in rows:
        if seen[event_id]:
            if redelivered:
                flagged += 1
            else:
                unflagged += 1
        seen[event_id] += 1
    return flagged, unflagged


def segments(data_dir: Path) -> list[Path]:
    return sorted((data_dir / "journal").glob("*.seg"))


def add_group(path: Path, name: str, group: dict) -> None:
    raw = yaml.safe_load(path.read_text())
    raw["workers"][name] = group
    path.write_text(yaml.safe_dump(raw))


# -- #2: a damaged journal ----------------------------------------------------------------------
def test_damaged_middle_segment_is_skipped_not_deleted(tmp_path, config_factory, launched):
    out, out_late = tmp_path / "rec", tmp_path / "late"
    path = config_factory(
        router={"journal": {"segment_bytes": "64KiB"}}, workers={"rec": recorder_group(out, processes=1)}
    )
    cfg = config.load(path)
    data_dir = Path(cfg.data_dir)
    p = launched(path)
    first = Sender(cfg.confirm, 12_000, chunk=500)
    first.run()
    assert first.error is None and len(first.acked) == 12_000
    wait_all_handled(out, first.acked)
    p.stop()
    segs = segments(data_dir)
    assert len(segs) >= 20
    victim = segs[len(segs) // 3]
    with open(victim, "r+b") as f:  # one damaged byte range in a closed middle segment
        f.seek(20_000)
        f.write(os.urandom(3000))
    verify = nexus_cli(path, "journal", "verify", "--json")
    assert verify.returncode == ExitCode.JOURNAL_DAMAGED, verify.stderr
    found = json.loads(verify.stdout)["damaged"]
    assert len(found) == 1 and found[0]["segment"] == victim.name
    lost_seqs = set(range(found[0]["first_seq"], found[0]["last_seq"] + 1))

    add_group(path, "late", recorder_group(out_late, processes=1))
    t0 = time.monotonic()
    p2 = launched(path)
    recover_s = round(time.monotonic() - t0, 2)
    assert [s.name for s in segments(data_dir)][: len(segs)] == [s.name for s in segs], "a segment was removed"
    status = p2.router_status()
    journal = status["router"]["journal"]
    assert journal["damaged_ranges"] == 1 and journal["damaged"][0]["first_seq"] == found[0]["first_seq"]
    assert status["router"]["seq"] >= 12_000
    assert p2.output().count("journal_damaged") == 1
    second = Sender(cfg.confirm, 2_000, chunk=500, source="after")
    second.run()
    assert second.error is None and len(second.acked) == 2_000
    rec = wait_all_handled(out, first.acked + second.acked)
    # the late group reads the whole journal: everything but the damaged range
    late_ids = {row[1]: row[2] for row in read_handled(str(out_late))}
    wait_for(
        lambda: len(set(handled_counter(out_late)) & set(second.acked)) == 2_000,
        120,
        0.1,
        "late group handled the events sent after the restart",
    )
    late = handled_counter(out_late)
    late_ids = {row[1]: row[2] for row in read_handled(str(out_late))}
    lost_late = set(first.acked) - set(late)
    flagged, unflagged = dup_counts(out)
    report(
        "journal_damaged_middle",
        sent=14_000,
        acked=len(first.acked) + len(second.acked),
        delivered_rec=len(rec),
        delivered_late=len(late),
        lost=len(set(first.acked + second.acked) - set(rec)),
        lost_late_in_damage=len(lost_late),
        damaged_seqs=len(lost_seqs),
        segments_kept=len(segments(data_dir)),
        dup_flagged=flagged,
        dup_unflagged=unflagged,
        recover_s=recover_s,
    )
    assert set(first.acked + second.acked) <= set(rec)
    assert len(lost_late) <= len(lost_seqs) and all(s not in lost_seqs for s in late_ids.values())
    assert unflagged == 0


def test_cursor_past_journal_end_is_reported_and_new_events_flow(tmp_path, config_factory, launched):
    out = tmp_path / "rec"
    path = config_factory(
        router={"journal": {"segment_bytes": "64KiB"}}, workers={"rec": recorder_group(out, processes=1)}
    )
    cfg = config.load(path)
    data_dir = Path(cfg.data_dir)
    p = launched(path)
    first = Sender(cfg.confirm, 6_000, chunk=500)
    first.run()
    assert first.error is None
    wait_all_handled(out, first.acked)
    wait_for(lambda: p.router_status()["groups"]["rec"]["lag"] == 0, 30, 0.1, "lag 0")
    p.stop()
    segs = segments(data_dir)
    for seg in segs[len(segs) // 2 :]:
        seg.unlink()  # the journal lost its tail (a restore, a mistake)
    verify = nexus_cli(path, "journal", "verify")
    assert verify.returncode == ExitCode.JOURNAL_DAMAGED and "cursor past end" in verify.stdout
    p2 = launched(path)
    past = p2.router_status()["router"]["journal"]["cursor_past_end"]
    assert past and past[0]["group"] == "rec" and past[0]["cursor"] > past[0]["last_seq"]
    assert "cursor_past_end" in p2.output()
    second = Sender(cfg.confirm, 2_000, chunk=500, source="after")
    second.run()
    assert second.error is None and len(second.acked) == 2_000
    rec = wait_all_handled(out, second.acked, 60)
    wait_for(lambda: p2.router_status()["groups"]["rec"]["lag"] == 0, 30, 0.1, "lag 0")
    flagged, unflagged = dup_counts(out)
    report(
        "cursor_past_end",
        sent=8_000,
        acked_after_restart=len(second.acked),
        delivered_after_restart=len(set(rec) & set(second.acked)),
        lost=len(set(second.acked) - set(rec)),
        cursor=past[0]["cursor"],
        last_seq=past[0]["last_seq"],
        dup_flagged=flagged,
        dup_unflagged=unflagged,
    )
    assert unflagged == 0


# -- #3: disk full -------------------------------------------------------------------------------
@pytest.fixture
def small_fs(tmp_path):
    """An 8 MB tmpfs mounted for the test (skipped where mounting is not permitted)."""
    mnt = tmp_path / "fs"
    mnt.mkdir()
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=8m", "tmpfs", str(mnt)], capture_output=True, text=True)
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs: {done.stderr.strip()}")
    try:
        yield mnt
    finally:
        subprocess.run(["umount", "-l", str(mnt)], check=False)


def fill(path: Path) -> int:
    """Write zeros to `path` until the filesystem is full; returns the bytes written."""
    n = 0
    fd = os.open(path, os.O_WRONLY | os.O_CREAT, 0o600)
    try:
        for chunk in (1 << 20, 1 << 16, 1 << 12, 1):
            try:
                while True:
                    n += os.write(fd, bytes(chunk))
            except OSError:
                continue
    finally:
        os.close(fd)
    return n


def test_disk_full_is_back_pressure_not_a_crash(tmp_path, small_fs, config_factory, launched):
    out_a, out_b = tmp_path / "a", tmp_path / "b"
    path = config_factory(
        data_dir=str(small_fs / "var"),
        router={"journal": {"segment_bytes": "512KiB"}},
        workers={"a": recorder_group(out_a, processes=1), "b": recorder_group(out_b, processes=1)},
    )
    cfg = config.load(path)
    p = launched(path)
    pid = router_pid(p)
    before = Sender(cfg.confirm, 2_000, chunk=200, source="before")
    before.run()
    assert before.error is None
    filler = small_fs / "filler"
    filled = fill(filler)
    # confirmed producers see the reason, never a bare timeout
    # (50 events of 1 KB: more than the slack left in the segment file's last page)
    probe = Producer(cfg.confirm, source="probe", ack_timeout=1.0)
    probe_ids = [probe.send("test.item", {"probe": i, "pad": "p" * 1000}) for i in range(50)]
    with pytest.raises(PeerError, match="storage_unavailable"):
        probe.flush(4)
    during = Sender(cfg.confirm, 3_000, chunk=200, source="during")
    during.start()
    wait_for(
        lambda: p.router_status()["router"]["rejected_by_reason"].get("storage_unavailable", 0) > 0,
        30,
        0.1,
        "storage_unavailable NACKs",
    )
    status = p.router_status()
    assert status["router"]["storage"]["state"] == "error"
    nacked = status["router"]["rejected_by_reason"]["storage_unavailable"]
    t_free = time.monotonic()
    filler.unlink()  # an operator frees space
    wait_for(lambda: p.router_status()["router"]["storage"]["state"] == "ok", 30, 0.1, "storage ok again")
    recover_s = round(time.monotonic() - t_free, 2)
    during.join(120)
    assert not during.is_alive() and during.error is None, during.error
    probe.flush(60)
    probe.close()
    acked = before.acked + during.acked + probe_ids
    a = wait_all_handled(out_a, acked, 120)
    b = wait_all_handled(out_b, acked, 120)
    output = p.output()
    fa, ua = dup_counts(out_a)
    fb, ub = dup_counts(out_b)
    report(
        "disk_full",
        sent=len(acked),
        acked=len(acked),
        nacked_storage=nacked,
        filled_bytes=filled,
        delivered_a=len(set(a) & set(acked)),
        delivered_b=len(set(b) & set(acked)),
        lost=len(set(acked) - set(a)) + len(set(acked) - set(b)),
        dup_flagged=fa + fb,
        dup_unflagged=ua + ub,
        storage_unavailable_logs=output.count("storage_unavailable "),
        storage_recovered_logs=output.count("storage_recovered"),
        router_pid_changed=router_pid(p) != pid,
        recover_s=recover_s,
    )
    assert router_pid(p) == pid, "the router restarted"
    assert set(acked) <= set(a) and set(acked) <= set(b)
    assert ua == 0 and ub == 0 and fa == 0 and fb == 0
    assert output.count("storage_recovered") >= 1


# -- #4: catch-up with big events -------------------------------------------------------------
def test_member_added_to_a_backlog_of_10kb_events_catches_up(tmp_path, config_factory, launched):
    out = tmp_path / "rec"
    path = config_factory(workers={"rec": recorder_group(out, processes=0)})
    cfg = config.load(path)
    p = launched(path)
    ids = send_big(cfg.confirm, 10_500, 10_000, keys=1)  # one partition: 105 MB
    pid = router_pid(p)
    sampler = RssSampler(pid)
    sampler.start()
    rss_before = rss_kb(pid)[0]
    t0 = time.monotonic()
    joiner = subprocess.Popen(
        [sys.executable, "-m", "nexus", "worker", "rec", "--name", "rec-late", "-c", str(path)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        handled = wait_all_handled(out, ids, 120)
        catch_up_s = round(time.monotonic() - t0, 2)
        peak = sampler.stop()
    finally:
        joiner.terminate()
        joiner.wait(30)
    flagged, unflagged = dup_counts(out)
    report(
        "catch_up_10kb",
        sent=len(ids),
        acked=len(ids),
        delivered_rec=len(handled),
        lost=len(set(ids) - set(handled)),
        dup_flagged=flagged,
        dup_unflagged=unflagged,
        recover_s=catch_up_s,
        router_rss_before_mb=rss_before // 1024,
        router_rss_peak_mb=peak // 1024,
    )
    assert set(ids) <= set(handled) and unflagged == 0
    assert peak < rss_before + 150 * 1024, "router memory grew with the backlog"


def test_late_group_over_1mb_events_catches_up(tmp_path, config_factory, launched):
    out = tmp_path / "late"
    path = config_factory(router={"max_event_bytes": "2MiB"}, workers={})
    cfg = config.load(path)
    p = launched(path)
    ids = send_big(cfg.confirm, 80, 1_000_000, keys=1)  # one partition: 80 MB
    p.stop()
    add_group(path, "late", recorder_group(out, processes=1))
    t0 = time.monotonic()
    p2 = launched(path)
    pid = router_pid(p2)
    sampler = RssSampler(pid)
    sampler.start()
    handled = wait_all_handled(out, ids, 120)
    catch_up_s = round(time.monotonic() - t0, 2)
    peak = sampler.stop()
    hwm = rss_kb(pid)[1]
    report(
        "late_group_1mb",
        sent=80,
        acked=len(ids),
        delivered_late=len(handled),
        lost=len(set(ids) - set(handled)),
        dup_unflagged=dup_counts(out)[1],
        recover_s=catch_up_s,
        router_rss_peak_mb=peak // 1024,
        router_hwm_mb=hwm // 1024,
    )
    assert set(ids) <= set(handled)
    assert hwm < 200 * 1024


# -- #17: status with a large backlog in bytes ---------------------------------------------------
def test_status_is_fast_with_a_large_backlog(tmp_path, config_factory, launched):
    out = tmp_path / "slow"
    path = config_factory(router={"max_event_bytes": "2MiB"}, workers={})
    cfg = config.load(path)
    p = launched(path)
    ids = send_big(cfg.confirm, 300, 1_000_000)  # ~300 MB of journal
    p.stop()
    # a group that handles slowly: its backlog stays while we ask for status
    add_group(path, "slow", recorder_group(out, processes=1, options={"sleep": 0.2}))
    t0 = time.monotonic()
    p2 = launched(path)  # waits for readiness (status over coord)
    ready_s = round(time.monotonic() - t0, 2)
    times, lags = [], []
    for _ in range(10):
        t = time.monotonic()
        status = p2.router_status(timeout=5.0)
        times.append(time.monotonic() - t)
        lags.append((status["groups"]["slow"]["lag"], len(handled_counter(out))))
    lag, done = lags[-1]
    report(
        "status_large_backlog",
        journal_mb=sum(s.stat().st_size for s in segments(Path(cfg.data_dir))) // MiB,
        events=len(ids),
        ready_s=ready_s,
        status_max_ms=round(max(times) * 1000, 1),
        lag=lag,
        handled=done,
    )
    # lag is exact: the events not yet acked (handled ones may still wait for their ack)
    assert isinstance(lag, int) and len(ids) - done - 50 <= lag <= len(ids)
    assert max(times) < 5.0


def test_status_is_answered_while_the_journal_is_read(tmp_path, config_factory):
    """Readiness does not wait for recovery: coord is bound first, and status requests
    are answered (marked recovering) between journal reads."""
    import zmq

    from nexus.protocol import transport
    from nexus.protocol.wire import StatusRequest, coord_decoder, encoder
    from nexus.router.server import Router

    cfg = config.load(config_factory(workers={"rec": recorder_group(tmp_path / "rec")}))
    router = Router(cfg)
    ctx = zmq.Context()
    try:
        router.coord = transport.bind(ctx, zmq.ROUTER, cfg.coord)
        asker = transport.connect(ctx, zmq.DEALER, cfg.coord, linger_ms=0)
        asker.send(encoder.encode(StatusRequest()))
        wait_for(lambda: router.coord.poll(0), 10, 0.01, "the request reached the router")
        router._answer_while_recovering()
        assert asker.poll(10_000)
        status = coord_decoder.decode(asker.recv()).data
        assert status["router"]["recovering"] is True
        assert status["groups"]["rec"]["members"] == [] and status["groups"]["rec"]["lag"] == "recovering"
        asker.close(0)
    finally:
        ctx.destroy(linger=0)
