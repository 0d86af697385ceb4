"""The HTTP process's pure parts: the health verdict, the chart series (histogram
quantiles over deltas), the listen address rules."""

from __future__ import annotations

import math

import pytest

from nexus.config import HttpConfig
from nexus.errors import ConfigError
from nexus.http import health
from nexus.http.listen import check, parse_listen
from nexus.http.series import LATENCY, LatencyDelta, Series, quantile

pytestmark = pytest.mark.unit


def launcher(ready=True, **extra):
    procs = [
        {"name": "router", "role": "router", "group": "", "state": "running"},
        {"name": "g-0", "role": "worker", "group": "g", "state": "running"},
        {"name": "idle-0", "role": "worker", "group": "idle", "state": "stopped"},
    ]
    return {"ok": True, "ready": ready, "processes": procs, **extra}


def router(unassigned=0, members=1, storage=None, recovering=False):
    return {
        "router": {"storage": storage or {"state": "ok", "errors": 0}, **({"recovering": True} if recovering else {})},
        "groups": {
            "g": {"partitions": 4, "unassigned": unassigned, "members": [{}] * members},
            "idle": {"partitions": 4, "unassigned": 4, "members": []},  # nobody wanted: not a reason
        },
    }


def test_healthy_pipeline_is_live_and_ready():
    assert health.verdict(launcher(), router()) == {"live": True, "ready": True, "reasons": []}
    assert health.verdict_line(health.verdict(launcher(), router())) == "health: live, ready"


def test_each_reason_is_named():
    assert health.liveness(None, None) == (False, ["launcher not answering", "router not answering"])
    ok, reasons = health.readiness(launcher(), router(unassigned=2, members=0))
    assert not ok and reasons == ["group g: 2 of 4 partitions unassigned (0 of 1 members joined)"]
    failing = {"state": "error", "failing": {"fsync": "OSError: EIO", "cursors": "OSError: ENOSPC"}}
    ok, reasons = health.readiness(launcher(), router(storage=failing))
    assert reasons == ["storage error (cursors: OSError: ENOSPC)", "journal not writable (fsync: OSError: EIO)"]
    _, reasons = health.readiness(launcher(ready=False), router(recovering=True))
    assert reasons[0].startswith("pipeline starting") and reasons[1].startswith("router recovering")
    # the launcher's scale, when it reports one, says how many members are wanted
    ok, reasons = health.readiness(launcher(scale={"g": 0, "idle": 2}), router())
    assert reasons == ["group idle: 4 of 4 partitions unassigned (0 of 2 members joined)"]
    assert health.verdict_line(health.verdict(None, router())).startswith("health: NOT LIVE, NOT READY: launcher")
    # a member given up on: named (not "starting": it will not come by itself)
    stuck = launcher(ready=False)
    stuck["processes"][1] |= {"state": "failed", "last_exit": "config error: bad option"}
    _, reasons = health.readiness(stuck, router(unassigned=4, members=0))
    assert reasons == [
        "process g-0 failed (config error: bad option)",
        "group g: 4 of 4 partitions unassigned (0 of 1 members joined)",
    ]


def test_quantile_interpolates_like_prometheus():
    buckets = [(0.1, 50.0), (0.5, 90.0), (1.0, 100.0), (math.inf, 100.0)]
    assert quantile(0.5, buckets) == pytest.approx(0.1)
    assert quantile(0.7, buckets) == pytest.approx(0.3)
    assert quantile(0.99, buckets) == pytest.approx(0.95)
    assert quantile(0.5, [(0.1, 0.0), (math.inf, 0.0)]) is None
    assert quantile(0.99, [(0.1, 1.0), (math.inf, 10.0)]) == 0.1  # in +Inf: its lower bound


def metrics(counts_by_member):
    return {
        "members": {
            m: {
                "histograms": {
                    LATENCY: [[{"group": "g", "member": m}, {"buckets": [[0.01, a], [0.1, b], [math.inf, b]]}]]
                }
            }
            for m, (a, b) in counts_by_member.items()
        }
    }


def test_latency_is_taken_over_the_interval_and_survives_a_member_restart():
    delta = LatencyDelta()
    assert delta.step(metrics({"m1": (10, 10)})) == [(0.01, 10.0), (0.1, 10.0), (math.inf, 10.0)]
    assert delta.step(metrics({"m1": (10, 30)})) == [(0.01, 0.0), (0.1, 20.0), (math.inf, 20.0)]
    # m1 restarted (its counts fell): its whole histogram is this interval's
    assert delta.step(metrics({"m1": (2, 2)})) == [(0.01, 2.0), (0.1, 2.0), (math.inf, 2.0)]
    assert delta.step(None) is None


def test_series_rate_and_lag():
    s = Series(size=3)
    status = {"router": {"accepted": 100}, "groups": {"g": {"lag": 7}, "r": {"lag": "recovering"}}}
    first = s.add(10.0, 1000.0, status, None)
    assert first["rate"] is None and first["lag"] == {"g": 7}
    second = s.add(12.0, 1002.0, {**status, "router": {"accepted": 150}}, None)
    assert second["rate"] == 25.0
    s.add(13.0, 1003.0, None, None)
    s.add(14.0, 1004.0, None, None)
    assert len(s.history()) == 3


@pytest.mark.parametrize(
    ("listen", "expected"),
    [("127.0.0.1:9464", ("127.0.0.1", 9464)), ("[::1]:80", ("::1", 80)), ("localhost:1", ("localhost", 1))],
)
def test_listen_parses(listen, expected):
    assert parse_listen(listen) == expected


@pytest.mark.parametrize("listen", ["9464", "127.0.0.1:", "127.0.0.1:0", "host:99999", "::1:9464", "[nope]:1"])
def test_listen_malformed_is_one_line(listen):
    with pytest.raises(ConfigError, match=r"^http\.listen"):
        parse_listen(listen)


def test_listen_off_loopback_needs_a_token():
    with pytest.raises(ConfigError, match="set http.token"):
        check(HttpConfig(listen="0.0.0.0:9464"))
