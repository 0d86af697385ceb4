"""Autoscaling on lag (issue 13 point 5) with a real launcher: a burst into a group of
slow handlers makes the members rise to max, then, once the lag is gone, fall back to
min, each member scaled away draining first. Prints the timeline (members and lag every
~0.5 s) and a FAULT-REPORT line (run pytest with -s to see them)."""

from __future__ import annotations

import re
import subprocess
import sys
import threading
import time

import pytest
from conftest import recorder_group
from test_faults import Sender, report, wait_all_handled
from test_faults_member import duplicates

from nexus import config
from nexus.testing import wait_for

pytestmark = pytest.mark.system

BURST = 1_500  # at 5 ms an event, ~7.5 s of work for one member, ~2.5 s for three


class Timeline(threading.Thread):
    """Samples the launcher's and the router's status every ~0.5 s until stopped."""

    def __init__(self, pipeline):
        super().__init__(daemon=True)
        self.pipeline = pipeline
        self.rows: list[dict] = []
        self.halt = threading.Event()
        self.t0 = time.monotonic()

    def run(self) -> None:
        while not self.halt.is_set():
            self.sample()
            self.halt.wait(0.5)  # the sampling period, not a synchronization

    def sample(self) -> None:
        launcher = self.pipeline.control("status", timeout=1.0) or {}
        router = self.pipeline.router_status(1.0) or {}
        auto = launcher.get("autoscale", {}).get("rec", {})
        group = router.get("groups", {}).get("rec", {})
        self.rows.append(
            {
                "t": round(time.monotonic() - self.t0, 1),
                "members": auto.get("members"),
                "desired": launcher.get("scale", {}).get("rec"),
                "joined": len(group.get("members", [])),
                "lag": group.get("lag"),
                "up": auto.get("decisions", {}).get("up"),
                "down": auto.get("decisions", {}).get("down"),
            }
        )

    def first(self, cond) -> float | None:
        return next((r["t"] for r in self.rows if cond(r)), None)


def autoscale_state(p) -> dict:
    reply = p.control("status", timeout=1.0) or {}
    return {**reply.get("autoscale", {}).get("rec", {}), "desired": reply.get("scale", {}).get("rec")}


def test_burst_scales_members_up_to_max_and_back_to_min_losing_nothing(tmp_path, config_factory, launched):
    out = tmp_path / "rec"
    auto = {"min": 1, "max": 3, "target_lag": 20, "cooldown": "2s"}
    path = config_factory(workers={"rec": recorder_group(out, processes=1, options={"sleep": 0.005}, autoscale=auto)})
    cfg = config.load(path)
    p = launched(path)
    assert autoscale_state(p)["members"] == 1
    refused = p.control("scale", group="rec", n=5)
    assert refused is not None and not refused["ok"]
    assert refused["error"].startswith("group rec autoscales within [1, 3]: N must be in that range")
    taken = p.control("scale", group="rec", n=1)  # within the bounds: taken (the cooldown restarts)
    assert taken is not None and taken["ok"] and taken["autoscale"] == {"min": 1, "max": 3, "cooldown": 2.0}

    timeline = Timeline(p)
    timeline.start()
    try:
        sender = Sender(cfg.confirm, BURST, chunk=500)
        sender.start()
        sender.join(60)
        assert sender.error is None and len(sender.acked) == BURST
        wait_for(lambda: autoscale_state(p).get("members") == 3, 20, 0.1, "members to rise to max (3)")
        wait_for(
            lambda: (p.router_status(1.0) or {}).get("groups", {}).get("rec", {}).get("lag") == 0, 30, 0.1, "lag 0"
        )
        handled = wait_all_handled(out, sender.acked, 30)
        wait_for(
            lambda: (s := autoscale_state(p)).get("members") == 1 and s["desired"] == 1, 30, 0.1, "back to min (1)"
        )
        status = subprocess.run(
            [sys.executable, "-m", "nexus", "status", "-c", str(path)], capture_output=True, text=True, timeout=30
        )
    finally:
        timeline.halt.set()
        timeline.join(5)
    timeline.sample()  # the state it ended in
    state = autoscale_state(p)
    print("\nAUTOSCALE-TIMELINE (t s, members running, desired, joined the router, lag)")
    for r in timeline.rows:
        print(f"  t={r['t']:>5}s members={r['members']} desired={r['desired']} joined={r['joined']} lag={r['lag']}")
    flagged, unflagged = duplicates(out)
    lost = set(sender.acked) - set(handled)
    log = p.output()
    report(
        "autoscale",
        sent=BURST,
        acked=len(sender.acked),
        delivered_rec=len(set(handled)),
        lost=len(lost),
        dup_flagged=flagged,
        dup_unflagged=unflagged,
        peak_members=max((r["members"] or 0) for r in timeline.rows),
        up=state["decisions"]["up"],
        down=state["decisions"]["down"],
        at_max_s=timeline.first(lambda r: r["members"] == 3),
        lag0_s=timeline.first(lambda r: r["lag"] == 0 and (r["up"] or 0) > 0),
        back_at_min_s=timeline.first(lambda r: r["desired"] == 1 and (r["down"] or 0) >= 1 and r["members"] == 1),
    )
    assert not lost and unflagged == 0  # every ACKed event handled; a repeat only as a flagged redelivery
    assert state["decisions"]["up"] >= 1 and state["decisions"]["down"] >= 2
    assert state["last_reason"].startswith("lag per member 0.0 at or under 5")
    # every decision is logged with group, from, to, lag and reason
    logged = [
        (int(m.group(1)), int(m.group(2)))
        for m in re.finditer(
            r"\] autoscale +from=(\d+) group=rec lag=\d+ lag_per_member=\S+ \S+ reason='[^']+' to=(\d+)", log
        )
    ]
    assert len(logged) == state["decisions"]["up"] + state["decisions"]["down"], log[-3000:]
    assert logged[0][0] == 1 and max(to for _, to in logged) == 3 and logged[-1] == (2, 1)
    assert status.returncode == 0, status.stderr
    line = next(x for x in status.stdout.splitlines() if x.startswith("rec ") and "1..3" in x)
    assert line.split()[1:4] == ["1", "1", "1..3"]  # members, desired, bounds
