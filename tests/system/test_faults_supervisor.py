"""Fault tests of the supervisor and the process lifecycle (issue 10: defects 1, 7, 10,
13, 15, 18, readiness): real launchers, real signals, real files.

Each test prints a `FAULT-REPORT` line (run pytest with -s to see them).
"""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from conftest import recorder_group
from test_faults import Sender, duplicates, report, verify_journal, wait_all_handled

from nexus import Producer, config
from nexus.errors import ConfigError, ExitCode
from nexus.testing import LaunchedPipeline, free_port, pid_alive, wait_for

pytestmark = pytest.mark.system


def launch_cmd(path) -> list[str]:
    return [sys.executable, "-m", "nexus.launch", "-c", str(path)]


def cli(*args, timeout: float = 30) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "nexus", *args], capture_output=True, text=True, timeout=timeout)


def proc_of(p: LaunchedPipeline, name: str) -> dict:
    return {x["name"]: x for x in p.processes()}.get(name, {})


def sockets_in(run_dir: Path) -> list[str]:
    import stat

    return sorted(f.name for f in run_dir.iterdir() if stat.S_ISSOCK(f.lstat().st_mode)) if run_dir.exists() else []


# -- 7: launcher SIGKILL, then restart --------------------------------------------------------
def test_launcher_sigkill_restart_flags_every_duplicate(tmp_path, config_factory, launched):
    out = tmp_path / "rec"
    path = config_factory(workers={"rec": recorder_group(out, processes=2)})
    cfg = config.load(path)
    p = launched(path)
    pids = p.child_pids()
    sender = Sender(cfg.confirm, 12_000, chunk=100, pace=0.01)
    sender.start()
    wait_for(lambda: len(sender.acked) >= 4000, 60, message="4000 acked")
    p.proc.kill()  # no drain, no final acks
    p.proc.wait(10)
    for pid in pids:  # children die with the launcher
        wait_for(lambda: not pid_alive(pid), 10, message=f"child {pid} to die with the launcher")
    stale = sockets_in(Path(cfg.data_dir) / "run")
    t0 = time.monotonic()
    p2 = launched(path)
    sender.join(180)
    assert sender.error is None and len(sender.acked) == 12_000
    handled = wait_all_handled(out, sender.acked, 120)
    recover_s = round(time.monotonic() - t0, 2)
    d = duplicates(out)
    report(
        "launcher_sigkill_restart",
        sent=12_000,
        acked=len(sender.acked),
        delivered_rec=d["delivered"],
        lost=len(set(sender.acked) - set(handled)),
        dup_flagged=d["dup_flagged"],
        dup_unflagged=d["dup_unflagged"],
        stale_sockets=len(stale),
        recover_s=recover_s,
    )
    assert "stale_run_cleaned" in p2.output()
    assert set(sender.acked) <= set(handled)
    assert d["dup_unflagged"] == 0


# -- 10: a handler that forks ------------------------------------------------------------------
def forked_pids(out: Path, seen: set[str]) -> list[int]:
    pids = []
    for f in sorted(out.glob("forked-*.txt")):
        if f.name not in seen:
            seen.add(f.name)
            pids += [int(x) for x in f.read_text().split()]
    return pids


def send_some(endpoint: str, n: int, source: str) -> list[str]:
    with Producer(endpoint, source=source) as producer:
        ids = [producer.send("test.item", {"i": i}, key=f"k{i}") for i in range(n)]
        producer.flush(30)
    return ids


def test_forking_handler_leaves_no_orphans(tmp_path, config_factory, launched):
    out = tmp_path / "fork"
    group = recorder_group(out, processes=1)
    group["handler"] = "forker:handle"
    path = config_factory(workers={"fork": group})
    cfg = config.load(path)
    seen: set[str] = set()
    acked: list[str] = []

    def alive(pids):
        return [pid for pid in pids if pid_alive(pid)]

    p = launched(path)
    acked += send_some(cfg.confirm, 50, "one")
    first = wait_for(lambda: forked_pids(out, seen), 30, message="forks recorded")
    assert len(alive(first)) == 3
    # a member SIGKILLed: what its handler forked goes with it
    member = proc_of(p, "fork-0")
    os.kill(member["pid"], signal.SIGKILL)
    wait_for(lambda: not alive(first), 10, message="forks of the killed member to end")
    wait_for(lambda: proc_of(p, "fork-0").get("pid") not in (None, member["pid"]), 30, message="member restarted")
    acked += send_some(cfg.confirm, 50, "two")
    second = wait_for(lambda: forked_pids(out, seen), 30, message="forks of the restarted member")
    # a graceful stop: the member ends its handler's children, the launcher the rest
    assert p.stop() == 0
    after_stop = alive(second)
    # the launcher SIGKILLed: its member dies too, its forks are left to init; the next
    # launcher on this data dir ends them (they carry the killed run's token)
    p = launched(path)
    acked += send_some(cfg.confirm, 50, "three")
    third = wait_for(lambda: forked_pids(out, seen), 30, message="forks before the launcher kill")
    p.proc.kill()
    p.proc.wait(10)
    left_by_kill = len(alive(third))
    p = launched(path)
    wait_for(lambda: not alive(third), 10, message="leftovers of the killed run to be ended")
    handled = wait_all_handled(out, acked, 60)
    p.stop()
    report(
        "forking_handler",
        sent=150,
        acked=len(acked),
        delivered_fork=len(set(handled) & set(acked)),
        lost=len(set(acked) - set(handled)),
        forked=len(first) + len(second) + len(third),
        orphans_after_member_kill=len(alive(first)),
        orphans_after_stop=len(after_stop),
        left_by_launcher_kill=left_by_kill,
        orphans_after_restart=len(alive(third)),
    )
    assert after_stop == []
    assert set(acked) <= set(handled)


# -- 1: one pipeline per data dir -------------------------------------------------------------
def test_second_pipeline_on_the_same_data_dir_is_refused(tmp_path, config_factory, launched):
    from nexus.router.server import Router

    out = tmp_path / "rec"
    path = config_factory(workers={"rec": recorder_group(out, processes=2)})
    cfg = config.load(path)
    p = launched(path)
    sender = Sender(cfg.confirm, 11_000, chunk=100, pace=0.01)
    sender.start()
    wait_for(lambda: len(sender.acked) >= 3000, 60, message="3000 acked")
    journal_files = sorted((Path(cfg.data_dir) / "journal").iterdir())
    second = subprocess.run(launch_cmd(path), capture_output=True, text=True, timeout=30)
    lines = second.stderr.strip().splitlines()
    # a router started alone (as tests run it) beside the launched one refuses too
    router_pid = proc_of(p, "router")["pid"]
    with pytest.raises(ConfigError) as refused:
        Router(cfg).run()
    assert p.control("status") is not None  # the first launcher's control socket still answers
    sender.join(120)
    assert sender.error is None and len(sender.acked) == 11_000
    handled = wait_all_handled(out, sender.acked, 120)
    members = {x["name"] for x in p.processes()}
    p.stop()
    journal = verify_journal(Path(cfg.data_dir), sender.acked)
    d = duplicates(out)
    report(
        "second_launcher",
        sent=11_000,
        acked=len(sender.acked),
        delivered_rec=d["delivered"],
        lost=len(set(sender.acked) - set(handled)),
        dup_flagged=d["dup_flagged"],
        dup_unflagged=d["dup_unflagged"],
        second_exit=second.returncode,
        journal_records=journal["records"],
        truncated_bytes=journal["truncated_bytes"],
    )
    assert second.returncode == ExitCode.CONFIG
    assert len(lines) == 1 and f"pid {p.proc.pid}" in lines[0] and "in use" in lines[0], second.stderr
    assert f"another router (pid {router_pid})" in str(refused.value)
    assert journal["truncated_bytes"] == 0 and journal_files[0].exists()
    assert members == {"router", "rec-0", "rec-1"}
    assert set(sender.acked) <= set(handled) and d["dup_unflagged"] == 0


# -- 13: a port in use ------------------------------------------------------------------------
@pytest.mark.parametrize("where", ["control", "ingest"])
def test_port_in_use_is_one_line_and_exit_3(tmp_path, config_factory, where):
    port = free_port()
    taken = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    taken.bind(("127.0.0.1", port))
    taken.listen(1)
    try:
        endpoint = f"tcp://127.0.0.1:{port}"
        overrides = {"control": endpoint} if where == "control" else {"router": {"ingest": endpoint}}
        path = config_factory(workers={}, **overrides)
        t0 = time.monotonic()
        result = subprocess.run(launch_cmd(path), capture_output=True, text=True, timeout=60)
        seconds = round(time.monotonic() - t0, 2)
    finally:
        taken.close()
    text = result.stdout + result.stderr
    bind_lines = [line for line in text.splitlines() if "bind" in line]
    report(
        f"port_in_use_{where}",
        exit_code=result.returncode,
        tracebacks=text.count("Traceback"),
        bind_error_lines=len(bind_lines),
        recover_s=seconds,
    )
    assert result.returncode == ExitCode.CONFIG, text
    assert "Traceback" not in text
    assert bind_lines and all(endpoint in line for line in bind_lines)
    if where == "control":
        assert len(result.stderr.strip().splitlines()) == 1  # nothing started, one line


# -- 15: children run on the config the launcher validated -------------------------------------
def test_half_edited_config_on_disk_does_not_reach_restarted_children(tmp_path, config_factory, launched):
    out = tmp_path / "rec"
    path = config_factory(workers={"rec": recorder_group(out, processes=2)})
    cfg = config.load(path)
    good = path.read_text()
    p = launched(path)
    sender = Sender(cfg.confirm, 8_000, chunk=100, pace=0.01)
    sender.start()
    wait_for(lambda: len(sender.acked) >= 2000, 60, message="2000 acked")
    path.write_text(good[: len(good) // 2] + "\nworkers: {rec: [\n")  # an editor mid-save
    t0 = time.monotonic()
    member, router = proc_of(p, "rec-0"), proc_of(p, "router")
    os.kill(member["pid"], signal.SIGKILL)
    os.kill(router["pid"], signal.SIGKILL)
    wait_for(
        lambda: all(
            proc_of(p, n).get("state") == "running" and proc_of(p, n).get("pid") != old["pid"]
            for n, old in (("rec-0", member), ("router", router))
        ),
        60,
        message="member and router restarted on the validated config",
    )
    recover_s = round(time.monotonic() - t0, 2)
    refused = p.control("reload")  # the launcher checks the file: refused, nothing changes
    sender.join(180)
    assert sender.error is None and len(sender.acked) == 8_000
    handled = wait_all_handled(out, sender.acked, 120)
    states = {x["name"]: x["state"] for x in p.processes()}
    # the file fixed, with a new limit: reload applies it live, and a restarted router keeps it
    fixed = yaml.safe_load(good)
    fixed["router"]["rate_limits"] = {"sources": {"other": {"rate": 7, "burst": 9}}}
    path.write_text(yaml.safe_dump(fixed))
    applied = cli("reload", "-c", str(path))
    router = proc_of(p, "router")
    os.kill(router["pid"], signal.SIGKILL)
    wait_for(
        lambda: (p.router_status(0.5) or {}).get("router", {}).get("pid") not in (None, router["pid"]),
        60,
        message="router restarted",
    )
    limits = p.router_status()["router"]["rate_limits"]
    d = duplicates(out)
    report(
        "config_edited_on_disk",
        sent=8_000,
        acked=len(sender.acked),
        delivered_rec=d["delivered"],
        lost=len(set(sender.acked) - set(handled)),
        dup_flagged=d["dup_flagged"],
        dup_unflagged=d["dup_unflagged"],
        failed=sum(s == "failed" for s in states.values()),
        launcher_alive=int(p.proc.poll() is None),
        recover_s=recover_s,
    )
    assert refused is not None and not refused["ok"] and str(path) in refused["error"]
    assert set(states.values()) == {"running"} and p.proc.poll() is None
    assert set(sender.acked) <= set(handled) and d["dup_unflagged"] == 0
    assert applied.returncode == 0 and "other" in applied.stdout, applied.stderr
    assert limits.get("other", {}).get("rate") == 7


# -- 18: hang detection -------------------------------------------------------------------------
def test_hung_router_and_member_are_restarted(tmp_path, config_factory, launched):
    out = tmp_path / "rec"
    path = config_factory(hang_timeout="1.5s", workers={"rec": recorder_group(out, processes=2)})
    cfg = config.load(path)
    p = launched(path)
    sender = Sender(cfg.confirm, 10_000, chunk=100, pace=0.02)
    sender.start()
    seen_hung, recover = {}, {}
    for name, after in (("router", 2000), ("rec-1", 5000)):
        wait_for(lambda: len(sender.acked) >= after, 60, message=f"{after} acked")
        victim = proc_of(p, name)
        os.kill(victim["pid"], signal.SIGSTOP)  # alive, but not a single beat any more
        t0 = time.monotonic()
        # (the launcher's status, which `nexus status` prints; the CLI itself waits 3 s for a stopped router)
        seen_hung[name] = wait_for(
            lambda: proc_of(p, name).get("state") == "hung" and proc_of(p, name), 30, 0.02, message=f"{name} shown hung"
        )
        wait_for(
            lambda: proc_of(p, name).get("state") == "running" and proc_of(p, name)["pid"] != victim["pid"],
            30,
            message=f"{name} restarted",
        )
        recover[name] = round(time.monotonic() - t0, 2)
        assert not pid_alive(victim["pid"])
    sender.join(180)
    assert sender.error is None and len(sender.acked) == 10_000
    handled = wait_all_handled(out, sender.acked, 120)
    procs = {x["name"]: x for x in p.processes()}
    table = cli("status", "-c", str(path)).stdout
    d = duplicates(out)
    report(
        "hung_router_and_member",
        sent=10_000,
        acked=len(sender.acked),
        delivered_rec=d["delivered"],
        lost=len(set(sender.acked) - set(handled)),
        dup_flagged=d["dup_flagged"],
        dup_unflagged=d["dup_unflagged"],
        recover_s_router=recover["router"],
        recover_s_member=recover["rec-1"],
    )
    assert seen_hung["router"]["state"] == seen_hung["rec-1"]["state"] == "hung"
    for name in ("router", "rec-1"):
        assert procs[name]["restarts"] == 1 and procs[name]["last_exit"].startswith("hung"), procs[name]
    assert p.output().count("process_hung") == 2
    assert sum("hung (signal SIGKILL)" in line for line in table.splitlines()) == 2, table
    assert set(sender.acked) <= set(handled) and d["dup_unflagged"] == 0


# -- readiness: a router slow to start is waited for while it beats --------------------------------
def test_slow_router_start_is_waited_for_while_it_beats(tmp_path, config_factory):
    out = tmp_path / "rec"
    path = config_factory(
        hang_timeout="1s",
        contracts=["nexus.contracts", "slow_contracts"],
        workers={"rec": recorder_group(out, processes=1)},
    )
    cfg = config.load(path)
    p = LaunchedPipeline(path, env={"SLOW_ROUTER_START": "16"})  # past the old fixed 15 s
    t0 = time.monotonic()
    try:
        p.start(wait_ready=False)
        # meanwhile the launcher answers status (it no longer blocks in a readiness wait)
        wait_for(lambda: proc_of(p, "router").get("state") == "running", 30, message="launcher answering")
        p.wait_ready(60)
        ready_s = round(time.monotonic() - t0, 2)
        ids = send_some(cfg.confirm, 100, "ready")
        handled = wait_all_handled(out, ids, 60)
    finally:
        p.stop()
    report(
        "slow_router_start",
        sent=100,
        acked=len(ids),
        delivered_rec=len(set(handled) & set(ids)),
        lost=len(set(ids) - set(handled)),
        ready_s=ready_s,
    )
    assert ready_s >= 16 and "process_hung" not in p.output()
    assert set(ids) <= set(handled)


# -- member exits: the router is told at once; a recycle is a restart, not a crash -----------------
def test_member_exit_is_told_to_the_router_and_recycle_is_not_a_crash(tmp_path, config_factory, launched):
    out_rec, out_cyc = tmp_path / "rec", tmp_path / "cyc"
    cyc = recorder_group(out_cyc, processes=1, options={"every": 400})
    cyc["handler"] = "recorder:recycling"
    # heartbeats so slow that only the launcher's report can free a dead member's partitions in time
    path = config_factory(
        crash_loop=1,
        router={"heartbeat_interval": "5s", "heartbeat_misses": 6},
        workers={"rec": recorder_group(out_rec, processes=2), "cyc": cyc},
    )
    cfg = config.load(path)
    p = launched(path)
    sender = Sender(cfg.confirm, 3_000, chunk=100, pace=0.02)
    sender.start()
    wait_for(lambda: len(sender.acked) >= 1000, 60, message="1000 acked")
    victim = proc_of(p, "rec-1")
    os.kill(victim["pid"], signal.SIGKILL)
    wait_for(lambda: re.search(r"member_exited .*member=rec-1", p.output()), 20, message="router told of the exit")
    sender.join(180)
    assert sender.error is None and len(sender.acked) == 3_000
    rec = wait_all_handled(out_rec, sender.acked, 120)
    cyc_handled = wait_all_handled(out_cyc, sender.acked, 120)
    # a recycle right after a start waits restart_backoff[0] ("backoff"): wait until both
    # are running again (a crash loop would leave them "failed" and this would time out)
    wait_for(
        lambda: all(proc_of(p, n).get("state") == "running" for n in ("rec-1", "cyc-0")),
        30,
        message="rec-1 and cyc-0 running again",
    )
    procs = {x["name"]: x for x in p.processes()}
    d_rec, d_cyc = duplicates(out_rec), duplicates(out_cyc)
    report(
        "member_exit_and_recycle",
        sent=3_000,
        acked=len(sender.acked),
        delivered_rec=d_rec["delivered"],
        delivered_cyc=d_cyc["delivered"],
        lost=len(set(sender.acked) - set(rec)) + len(set(sender.acked) - set(cyc_handled)),
        dup_flagged=d_rec["dup_flagged"] + d_cyc["dup_flagged"],
        dup_unflagged=d_rec["dup_unflagged"] + d_cyc["dup_unflagged"],
        recycles=procs["cyc-0"]["restarts"],
    )
    assert "(signal SIGKILL)" in procs["rec-1"]["last_exit"] and procs["rec-1"]["state"] == "running"
    # crash_loop=1 would have failed it on the second crash: recycles are not crashes
    assert procs["cyc-0"]["restarts"] >= 5 and procs["cyc-0"]["state"] == "running"
    assert procs["cyc-0"]["last_exit"] == "recycled"
    assert d_rec["dup_unflagged"] == 0 and d_cyc["dup_unflagged"] == 0


# -- 7 (router side): members survive a router restart and keep their partitions ----------------
def test_router_kill_with_surviving_members_flags_or_drops_every_duplicate(tmp_path, config_factory, launched):
    out = tmp_path / "rec"
    path = config_factory(workers={"rec": recorder_group(out, processes=3)})
    cfg = config.load(path)
    p = launched(path)
    p.wait_members("rec", 3)
    members_before = {x["name"]: x["pid"] for x in p.processes() if x["role"] == "worker"}
    sender = Sender(cfg.confirm, 12_000, chunk=100, pace=0.01)
    sender.start()
    recover = []
    for kill in range(2):
        wait_for(lambda: len(sender.acked) >= 3000 * (kill + 1), 60, message="progress before the kill")
        router = proc_of(p, "router")
        os.kill(router["pid"], signal.SIGKILL)
        t0 = time.monotonic()
        wait_for(lambda: proc_of(p, "router").get("pid") not in (None, router["pid"]), 30, message="router restarted")
        p.wait_members("rec", 3, 60)
        recover.append(round(time.monotonic() - t0, 2))
    sender.join(180)
    assert sender.error is None and len(sender.acked) == 12_000
    handled = wait_all_handled(out, sender.acked, 120)
    members_after = {x["name"]: x["pid"] for x in p.processes() if x["role"] == "worker"}
    d = duplicates(out)
    report(
        "router_kill_surviving_members",
        sent=12_000,
        acked=len(sender.acked),
        router_kills=2,
        delivered_rec=d["delivered"],
        lost=len(set(sender.acked) - set(handled)),
        dup_flagged=d["dup_flagged"],
        dup_unflagged=d["dup_unflagged"],
        recover_s=max(recover),
    )
    assert members_after == members_before  # the members lived through it
    assert set(sender.acked) <= set(handled)
    assert d["dup_unflagged"] == 0
