"""Hot reload with real launched pipelines: a rolling restart under a confirmed load
(every ACKed event handled exactly once), groups and producers added and removed, the
log level of the children, and what a reload refuses.

Each test prints a `FAULT-REPORT` line (run pytest with -s to see them).
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import yaml
from conftest import recorder_group
from recorder import read_handled, read_tags, tally
from test_faults import report

from nexus import Producer, config
from nexus.testing import LaunchedPipeline, wait_for

pytestmark = pytest.mark.system


def cli(path: Path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "nexus", "reload", "-c", str(path), *args], capture_output=True, text=True, timeout=60
    )


def edit(path: Path, change) -> None:
    raw = yaml.safe_load(path.read_text())
    change(raw)
    path.write_text(yaml.safe_dump(raw))


def reload_state(p: LaunchedPipeline) -> dict:
    reply = p.control("status") or {}
    return reply.get("reload") or {}


def wait_reload_done(p: LaunchedPipeline, since: float, timeout: float = 60) -> dict:
    """The state of the reload started at or after wall time `since`, once it finished."""

    def finished() -> bool:
        state = reload_state(p)
        return state.get("last", 0) >= since and state.get("in_progress") is False

    wait_for(finished, timeout, 0.1, "the reload to finish")
    return reload_state(p)


class SteadyLoad(threading.Thread):
    """Confirmed sends in flushes of `chunk` until stopped; keeps the ACKed ids."""

    def __init__(self, endpoint: str, chunk: int = 50, pace: float = 0.01):
        super().__init__(daemon=True)
        self.endpoint, self.chunk, self.pace = endpoint, chunk, pace
        self.acked: list[str] = []
        self.error: BaseException | None = None
        self.halt = threading.Event()

    def run(self) -> None:
        try:
            with Producer(self.endpoint, source="reload", ack_timeout=1.0) as producer:
                i = 0
                while not self.halt.is_set():
                    pending = []
                    for _ in range(self.chunk):
                        pending.append(producer.send("test.item", {"i": i}, key=f"k{i % 64}"))
                        i += 1
                    producer.flush(120)
                    self.acked += pending
                    time.sleep(self.pace)  # pacing the load, not synchronizing
        except BaseException as exc:
            self.error = exc

    def stop(self) -> list[str]:
        self.halt.set()
        self.join(120)
        assert not self.is_alive() and self.error is None, self.error
        return self.acked


def counts(rows, ids: set[str]) -> dict:
    """Delivered, lost and duplicates (flagged: the extra handlings carry ctx.redelivered)."""
    handled, flagged, unflagged = tally(r for r in rows if r[1] in ids)
    return {"delivered": len(handled), "lost": len(ids - handled), "flagged": flagged, "unflagged": unflagged}


def handled_all(out: Path, ids: set[str]) -> bool:
    return ids <= {r[1] for r in read_handled(str(out))}


def member_pids(p: LaunchedPipeline, group: str) -> dict[str, int]:
    return {x["name"]: x["pid"] for x in p.processes() if x["group"] == group and x["state"] == "running"}


# -- (a) a rolling restart under load: exactly once; a crash and a second reload during one ----
def test_rolling_restart_under_load_handles_every_event_once(tmp_path, config_factory, launched):
    out = tmp_path / "rec"
    path = config_factory(workers={"rec": recorder_group(out, processes=3, options={"tag": "v1"})})
    cfg = config.load(path)
    p = launched(path)
    before = member_pids(p, "rec")
    load = SteadyLoad(cfg.confirm)
    load.start()
    wait_for(lambda: len(load.acked) >= 1000, 60, message="1000 acked before the reload")

    edit(path, lambda raw: raw["workers"]["rec"]["options"].update(tag="v2"))
    t0, since = time.monotonic(), time.time()
    applied = cli(path)
    second = p.control("reload")  # while the first one still rolls: refused, one line
    progress = reload_state(p)
    done = wait_reload_done(p, since)
    roll_s = round(time.monotonic() - t0, 2)
    mark = len(load.acked)
    wait_for(lambda: len(load.acked) >= mark + 300, 60, message="300 more acked after the roll")
    acked = set(load.stop())
    wait_for(lambda: handled_all(out, acked), 120, 0.1, "every ACKed event handled")
    rows = read_handled(str(out))
    once = counts(rows, acked)
    after = member_pids(p, "rec")
    report(
        "reload_rolling_restart",
        acked=len(acked),
        delivered=once["delivered"],
        lost=once["lost"],
        dup_flagged=once["flagged"],
        dup_unflagged=once["unflagged"],
        roll_s=roll_s,
        restarted=len(done["rolling"]["rec"]["restarted"]),
    )
    assert applied.returncode == 0, applied.stderr
    assert "group rec: rolling restart for options" in applied.stdout and "in progress" in applied.stdout
    assert second is not None and not second["ok"] and "a reload is in progress" in second["error"]
    assert "\n" not in second["error"]
    assert progress["in_progress"] and progress["rolling"]["rec"]["of"] == 3
    assert done["ok"] and done["rolling"]["rec"]["restarted"] == ["rec-0", "rec-1", "rec-2"]
    assert once == {"delivered": len(acked), "lost": 0, "flagged": 0, "unflagged": 0}
    assert set(after) == set(before) and not set(after.values()) & set(before.values())  # all new processes
    # every event sent from now on is handled on the new option, by each member
    with Producer(cfg.confirm, source="after") as producer:
        late = {producer.send("test.item", {"i": i}, key=f"k{i % 64}") for i in range(300)}
        producer.flush(60)
    wait_for(lambda: handled_all(out, late), 60, 0.1, "late events handled")
    tags = [(m, t) for m, e, t in read_tags(str(out)) if e in late]
    assert {t for _, t in tags} == {"v2"} and {m for m, _ in tags} == {"rec-0", "rec-1", "rec-2"}

    # a second rolling restart, with a member not yet restarted killed during it: it
    # comes back on the new config and is passed over; nothing is lost, repeats are flagged
    load = SteadyLoad(cfg.confirm)
    load.start()
    wait_for(lambda: len(load.acked) >= 500, 60, message="500 acked before the second reload")
    edit(path, lambda raw: raw["workers"]["rec"]["options"].update(tag="v3"))
    since = time.time()
    first = p.control("reload", timeout=35)
    victim = member_pids(p, "rec")["rec-2"]
    os.kill(victim, signal.SIGKILL)
    done = wait_reload_done(p, since)
    acked = set(load.stop())
    wait_for(lambda: handled_all(out, acked), 120, 0.1, "every ACKed event handled")
    crash = counts(read_handled(str(out)), acked)
    with Producer(cfg.confirm, source="after3") as producer:
        late = {producer.send("test.item", {"i": i}, key=f"k{i % 64}") for i in range(300)}
        producer.flush(60)
    wait_for(lambda: handled_all(out, late), 60, 0.1, "late events handled")
    tags = {t for _, e, t in read_tags(str(out)) if e in late}
    report(
        "reload_rolling_restart_member_killed",
        acked=len(acked),
        delivered=crash["delivered"],
        lost=crash["lost"],
        dup_flagged=crash["flagged"],
        dup_unflagged=crash["unflagged"],
        passed=",".join(done["rolling"]["rec"]["passed"]),
    )
    assert first is not None and first["ok"], first
    assert done["ok"] and "rec-2" in done["rolling"]["rec"]["passed"]
    assert crash["lost"] == 0 and crash["unflagged"] == 0
    assert tags == {"v3"}


# -- (b) + (c): refusals and a dry run first, then groups, producers and the log level ---------
def test_reload_adds_and_removes_groups_producers_and_log_level(tmp_path, config_factory, launched):
    keep, gone, fresh = tmp_path / "keep", tmp_path / "gone", tmp_path / "fresh"
    path = config_factory(
        workers={
            "keep": recorder_group(keep, options={"debug": True}),
            "gone": recorder_group(gone),
        },
        producers={"tick_a": {"kind": "schedule", "every": "1s"}},
    )
    cfg = config.load(path)
    p = launched(path)
    original = path.read_text()
    procs = {x["name"]: x["pid"] for x in p.processes()}
    assert {"keep-0", "gone-0", "tick_a", "router"} <= set(procs)

    def new_config(raw):
        raw["workers"].pop("gone")
        raw["workers"]["fresh"] = recorder_group(fresh, processes=2, subscribe=["schedule.tick", "test.*"])
        raw["workers"]["fresh"]["start"] = "latest"
        raw["producers"] = {"tick_b": {"kind": "schedule", "every": "1s"}}
        raw["log"]["level"] = "debug"
        raw["router"]["max_batch"] = 4000  # needs a restart: reported, not applied

    # (c) a dry run prints the plan and applies nothing
    edit(path, new_config)
    dry = cli(path, "--dry-run")
    dry_json = p.control("reload", dry_run=True, timeout=30)  # (it imports the new handlers first)
    # a partition count change refuses the whole reload, one line naming it
    edit(path, lambda raw: raw["workers"]["keep"].update(partitions=8))
    parts = cli(path)
    # a file that does not validate: refused, the running config keeps going
    path.write_text(path.read_text() + "\nworkers_typo: {}\n")
    broken = cli(path)  # (the CLI reads the file too, to find the launcher: refused there)
    refused = p.control("reload")  # the launcher's own check
    unchanged = {x["name"]: x["pid"] for x in p.processes()}
    status = p.control("status")
    with Producer(cfg.confirm, source="before") as producer:
        early = {producer.send("test.item", {"i": i}) for i in range(50)}
        producer.flush(60)
    wait_for(lambda: handled_all(keep, early), 60, 0.1, "events handled before the reload")
    quiet_before = "recorder_debug_line" not in p.output()

    assert dry.returncode == 0, dry.stderr
    for line in (
        "dry run, nothing applied",
        "group fresh: added (2 processes)",
        "group gone: removed (its 1 member(s) drain and stop); its cursors are dropped; "
        "re-adding it starts by its `start` policy",
        "producer tick_a: removed",
        "producer tick_b: added",
        "log level: info -> debug",
        "would need a restart to apply: router.max_batch",
    ):
        assert line in dry.stdout, dry.stdout
    assert dry_json is not None and dry_json["dry_run"] and "group gone: removed" in " ".join(dry_json["changes"])
    assert parts.returncode == 3 and parts.stdout == ""
    assert parts.stderr.strip().splitlines() == [parts.stderr.strip()]
    assert "workers.keep.partitions 16 -> 8" in parts.stderr
    assert broken.returncode == 3 and len(broken.stderr.strip().splitlines()) == 1
    assert "workers_typo" in broken.stderr and "Traceback" not in broken.stderr
    assert refused is not None and not refused["ok"] and "workers_typo: unknown key" in refused["error"]
    assert unchanged == procs and status is not None
    assert not status["reload"]["ok"] and "workers_typo" in status["reload"]["error"]
    assert quiet_before

    # (b) apply it, by SIGHUP this time
    path.write_text(original)
    edit(path, new_config)
    t0, since = time.monotonic(), time.time()
    assert p.proc is not None
    p.proc.send_signal(signal.SIGHUP)
    done = wait_reload_done(p, since)
    applied_s = round(time.monotonic() - t0, 2)
    now = {x["name"]: x for x in p.processes()}
    shown = subprocess.run(
        [sys.executable, "-m", "nexus", "status", "-c", str(path)], capture_output=True, text=True, timeout=60
    )
    p.wait_members("fresh", 2)
    groups = (p.router_status() or {}).get("groups", {})
    with Producer(cfg.confirm, source="after") as producer:
        late = {producer.send("test.item", {"i": i}) for i in range(50)}
        producer.flush(60)
    wait_for(lambda: handled_all(keep, late) and handled_all(fresh, late), 60, 0.1, "events handled after")
    wait_for(lambda: any(r[1] for r in read_handled(str(fresh)) if r[1] not in late), 30, 0.1, "a tick in fresh")
    wait_for(lambda: "recorder_debug_line" in p.output(), 30, 0.1, "a debug line from keep-0")
    debug_lines = [line for line in p.output().splitlines() if "recorder_debug_line" in line]
    report(
        "reload_groups_producers",
        applied_s=applied_s,
        processes=len(now),
        groups=",".join(sorted(groups)),
        debug_lines=len(debug_lines),
        keep_handled=len(early | late),
    )
    assert done["ok"], done
    assert f"ok, {len(done['changes'])} change(s)" in shown.stdout, shown.stdout
    assert set(now) == {"router", "keep-0", "fresh-0", "fresh-1", "tick_b"}, now
    assert now["keep-0"]["pid"] == procs["keep-0"]  # an unchanged group is not touched
    assert set(groups) == {"keep", "fresh"}
    assert done["needs_restart"] == ["router.max_batch"]
    assert all("process=keep-0" in line for line in debug_lines)


# -- (d) a handler that does not import: refused before any member is touched; and SIGHUP
# sent to the router itself (`pkill -HUP -f nexus`) is ignored under a launcher -------------
def test_bad_handler_is_refused_and_the_router_ignores_its_own_sighup(tmp_path, config_factory, launched):
    out, extra = tmp_path / "rec", tmp_path / "extra"
    path = config_factory(workers={"rec": recorder_group(out, processes=2)})
    cfg = config.load(path)
    p = launched(path)
    before = {x["name"]: x["pid"] for x in p.processes()}

    def bad(raw):
        raw["workers"]["rec"]["handler"] = "recorder:no_such_function"
        raw["workers"]["extra"] = recorder_group(extra)

    edit(path, bad)
    dry = cli(path, "--dry-run")
    applied = cli(path)
    status = p.control("status") or {}
    after = {x["name"]: x["pid"] for x in p.processes()}
    # the router, signalled directly, must not re-read the file (it would add `extra`)
    router_pid, launcher_pid = before["router"], status["launcher"]["pid"]
    os.kill(router_pid, signal.SIGHUP)
    wait_for(lambda: "sighup_ignored" in p.output(), 30, 0.1, "the router's sighup_ignored line")
    ignored = next(line for line in p.output().splitlines() if "sighup_ignored" in line)
    groups = (p.router_status() or {}).get("groups", {})
    with Producer(cfg.confirm, source="after") as producer:
        sent = {producer.send("test.item", {"i": i}) for i in range(50)}
        producer.flush(60)
    wait_for(lambda: handled_all(out, sent), 60, 0.1, "events handled on the old handler")
    delivered = counts(read_handled(str(out)), sent)
    report(
        "reload_bad_handler",
        sent=len(sent),
        delivered=delivered["delivered"],
        lost=delivered["lost"],
        dup_flagged=delivered["flagged"],
        dup_unflagged=delivered["unflagged"],
    )

    why = "group rec: handler recorder:no_such_function: recorder has no attribute 'no_such_function'"
    for result in (dry, applied):
        assert result.returncode == 3 and result.stdout == "", result
        assert result.stderr.strip().splitlines() == [result.stderr.strip()] and why in result.stderr
    assert after == before and {x["state"] for x in p.processes()} == {"running"}
    assert not status["reload"]["ok"] and why in status["reload"]["error"]
    assert set(groups) == {"rec"} and {x["name"]: x["pid"] for x in p.processes()}["router"] == router_pid
    assert f"launcher_pid={launcher_pid}" in ignored and "nexus reload" in ignored
    assert delivered == {"delivered": 50, "lost": 0, "flagged": 0, "unflagged": 0}


# -- (e) a replacement that fails on the new config anyway: the group rolls back ------------
def test_a_replacement_failing_on_the_new_config_rolls_the_group_back(tmp_path, config_factory, launched):
    out = tmp_path / "rec"
    group = recorder_group(out, processes=2, options={"tag": "v1"})
    path = config_factory(workers={"rec": {**group, "handler": "recorder:Configured"}})
    cfg = config.load(path)
    p = launched(path)
    before = member_pids(p, "rec")
    load = SteadyLoad(cfg.confirm)
    load.start()
    wait_for(lambda: len(load.acked) >= 300, 60, message="300 acked before the reload")
    # the handler imports (the check passes); its class refuses the new options at start
    edit(path, lambda raw: raw["workers"]["rec"]["options"].update(tag="v2", refuse="no credentials for v2"))
    since = time.time()
    applied = p.control("reload", timeout=35)
    done = wait_reload_done(p, since)
    after = member_pids(p, "rec")
    # the members restart on the old config from now on: a crash of one comes back fine
    os.kill(after["rec-1"], signal.SIGKILL)

    def restarted() -> bool:
        pids = member_pids(p, "rec")
        return len(pids) == 2 and pids["rec-1"] != after["rec-1"]

    wait_for(restarted, 30, message="rec-1 restarted on the old config")
    p.wait_members("rec", 2)
    acked = set(load.stop())
    with Producer(cfg.confirm, source="after") as producer:
        late = {producer.send("test.item", {"i": i}, key=f"k{i % 64}") for i in range(200)}
        producer.flush(60)
    wait_for(lambda: handled_all(out, acked | late), 120, 0.1, "every ACKed event handled")
    result = counts(read_handled(str(out)), acked | late)
    tags = {t for _, e, t in read_tags(str(out)) if e in late}
    logged = [line for line in p.output().splitlines() if "group_rolling_restart" in line and "rolled_back" in line]
    report(
        "reload_rolled_back",
        acked=len(acked | late),
        delivered=result["delivered"],
        lost=result["lost"],
        dup_flagged=result["flagged"],
        dup_unflagged=result["unflagged"],
        reverted=",".join(done["rolling"]["rec"]["reverted"]),
    )
    assert applied is not None and applied["ok"], applied
    assert not done["ok"] and done["rolling"]["rec"]["rolled_back"]
    assert "rec-0 failed on the new config (config error: Configured: no credentials for v2)" in done["error"]
    assert "rolled back to the old config" in done["error"] and "\n" not in done["error"]
    assert done["rolling"]["rec"]["reverted"] == ["rec-0"] and after["rec-1"] == before["rec-1"]
    assert len(logged) == 1
    assert result["lost"] == 0 and result["unflagged"] == 0 and tags == {"v1"}
