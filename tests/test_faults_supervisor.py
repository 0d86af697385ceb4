"""Fault tests of the supervisor and the process lifecycle (issue 10: defects 1, 7, 10,
13, 15, 18, readiness): real launchers, real signals, real files.

Each test prints a `FAULT-REPORT` line (run pytest with -s to see them).
"""
from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections import Counter, defaultdict
from pathlib import Path

import pytest
import yaml

from conftest import recorder_group
from nexus import Producer, config
from nexus.errors import ConfigError, ExitCode
from nexus.testing import LaunchedPipeline, free_port, pid_alive, wait_for
from recorder import read_handled
from test_faults import Sender, report, verify_journal, wait_all_handled

pytestmark = pytest.mark.system


def launch_cmd(path) -> list[str]:
    return [sys.executable, "-m", "nexus.launch", "-c", str(path)]


def cli(*args, timeout: float = 30) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "nexus", *args], capture_output=True, text=True, timeout=timeout)


def duplicates(out: Path) -> dict:
    """Handlings beyond the first per event id; flagged when the extra handlings carry
    ctx.redelivered (an event handled n times needs n-1 flagged handlings)."""
    by_id: dict[str, list[int]] = defaultdict(list)
    for _member, event_id, _seq, _p, redelivered, _attempt in read_handled(str(out)):
        by_id[event_id].append(redelivered)
    flagged = unflagged = 0
    for flags in by_id.values():
        extra = len(flags) - 1
        if extra > 0:
            ok = min(extra, sum(flags))
            flagged += ok
            unflagged += extra - ok
    return {"delivered": len(by_id), "dup_flagged": flagged, "dup_unflagged": unflagged}


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
    p.proc.kill()                                   # no drain, no final acks
    p.proc.wait(10)
    for pid in pids:                                # children die with the launcher
        wait_for(lambda: not pid_alive(pid), 10, message=f"child {pid} to die with the launcher")
    stale = sockets_in(Path(cfg.data_dir) / "run")
    t0 = time.monotonic()
    p2 = launched(path)
    sender.join(180)
    assert sender.error is None and len(sender.acked) == 12_000
    handled = wait_all_handled(out, sender.acked, 120)
    recover_s = round(time.monotonic() - t0, 2)
    d = duplicates(out)
    report("launcher_sigkill_restart", sent=12_000, acked=len(sender.acked), delivered_rec=d["delivered"],
           lost=len(set(sender.acked) - set(handled)), dup_flagged=d["dup_flagged"],
           dup_unflagged=d["dup_unflagged"], stale_sockets=len(stale), recover_s=recover_s)
    assert "stale_run_cleaned" in p2.output()
    assert set(sender.acked) <= set(handled)
    assert d["dup_unflagged"] == 0
