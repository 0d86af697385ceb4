"""The HTTP process's pure parts: the health verdict, the chart series (histogram
quantiles over deltas), the listen address rules, the CSRF origin rule and the
generated token file."""

from __future__ import annotations

import math
import stat

import pytest

from nexus.config import Config, HttpConfig
from nexus.errors import ConfigError, ExitCode
from nexus.http import credential, health
from nexus.http.guard import same_host
from nexus.http.listen import check, parse_listen
from nexus.http.series import LATENCY, LatencyDelta, Series, quantile

pytestmark = pytest.mark.unit


IDLE_AUTOSCALE = {"idle": {"min": 0, "max": 2, "members": 0}}  # autoscaled to zero: not a reason


def launcher(ready=True, **extra):
    procs = [
        {"name": "router", "role": "router", "group": "", "state": "running"},
        {"name": "g-0", "role": "worker", "group": "g", "state": "running"},
        {"name": "idle-0", "role": "worker", "group": "idle", "state": "stopped"},
    ]
    return {"ok": True, "ready": ready, "processes": procs, "autoscale": IDLE_AUTOSCALE, **extra}


def router(unassigned=0, members=1, storage=None, recovering=False, **groups):
    return {
        "router": {"storage": storage or {"state": "ok", "errors": 0}, **({"recovering": True} if recovering else {})},
        "groups": {
            "g": {"partitions": 4, "unassigned": unassigned, "members": [{}] * members},
            "idle": {"partitions": 4, "unassigned": 4, "members": []},
            **groups,
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


def test_every_group_with_unassigned_partitions_is_a_reason_but_one_autoscaled_to_zero():
    # members in other containers or hosts (`processes: 0` here): not ready until they own every partition
    remote = {"partitions": 16, "unassigned": 16, "members": []}
    ok, reasons = health.readiness(launcher(scale={"g": 1, "work": 0, "idle": 0}), router(work=remote))
    assert not ok and reasons == [
        "group work: 16 of 16 partitions unassigned (0 members joined, none run by this launcher)"
    ]
    joined = {"partitions": 16, "unassigned": 0, "members": [{}, {}]}
    assert health.readiness(launcher(scale={"g": 1, "work": 0, "idle": 0}), router(work=joined)) == (True, [])
    # scaled to zero by hand (or processes: 0 without autoscale): events wait, not ready
    ok, reasons = health.readiness(launcher(autoscale={}), router())
    assert reasons == ["group idle: 4 of 4 partitions unassigned (0 members joined, none run by this launcher)"]
    # an autoscaled group whose min is above zero, at zero for a moment: a reason too
    ok, reasons = health.readiness(
        launcher(autoscale={"idle": {"min": 1, "max": 2}}, scale={"g": 1, "idle": 0}), router()
    )
    assert not ok and reasons[0].startswith("group idle: 4 of 4 partitions unassigned")
    # without the launcher's answer nothing is excused
    _, reasons = health.readiness(None, router())
    assert reasons == [
        "launcher not answering",
        "group idle: 4 of 4 partitions unassigned (0 members joined, none run by this launcher)",
    ]


def test_engine_nats_cluster_unreachable_or_leaderless_is_not_ready():
    engine = {"stream": "NEXUS", "reachable": True, "leader": "n1", "replicas": []}
    assert health.readiness(launcher(), router() | {"engine": engine}) == (True, [])
    gone = {"stream": "NEXUS", "reachable": False, "error": "TimeoutError"}
    ok, reasons = health.readiness(launcher(), router() | {"engine": gone})
    assert not ok and reasons == ["nats cluster unreachable (TimeoutError)"]
    ok, reasons = health.readiness(launcher(), router(unassigned=3) | {"engine": engine | {"leader": None}})
    assert not ok and reasons == [
        "nats stream NEXUS has no leader (no quorum: events cannot be stored)",
        "group g: 3 of 4 partitions unassigned (1 of 1 members joined)",
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


def test_points_without_latency_have_no_latency_keys():
    s = Series()
    asked = s.add(1.0, 1000.0, None, None)
    assert asked["p50"] is None and asked["p99"] is None  # asked, no answer: a gap in the chart
    skipped = s.add(2.0, 1001.0, None, None, latency=False)
    assert "p50" not in skipped and "p99" not in skipped  # not asked: the chart joins over it


@pytest.mark.parametrize(
    ("origin", "host", "same"),
    [
        ("http://127.0.0.1:9464", "127.0.0.1:9464", True),
        ("https://dash.example", "dash.example", True),  # TLS ends at a proxy that passes Host on
        ("https://dash.example", "dash.example:443", True),
        ("https://dash.example:8443", "dash.example:8443", True),
        ("http://[::1]:9464", "[::1]:9464", True),
        ("http://evil.example", "127.0.0.1:9464", False),
        ("https://127.0.0.1:9465", "127.0.0.1:9464", False),
        ("http://[::1]:9464", "[::1]:9465", False),
        ("null", "127.0.0.1:9464", False),
        ("http://127.0.0.1:9464", "", False),
    ],
)
def test_origin_must_name_the_host_in_either_scheme(origin, host, same):
    assert same_host(origin, host) is same


def test_the_generated_token_is_private_and_kept(tmp_path):
    cfg = Config(data_dir=str(tmp_path), http=HttpConfig(listen="127.0.0.1:9464"))
    with pytest.raises(ConfigError, match="no HTTP token in .*http.token yet"):
        credential.load(cfg)
    token = credential.ensure(cfg)
    path = tmp_path / credential.FILE
    assert stat.S_IMODE(path.stat().st_mode) == 0o600 and len(token) >= 40
    assert credential.ensure(cfg) == credential.load(cfg) == token  # kept: a restart uses it again
    path.write_text("cut short")  # a write that never finished: made again
    assert credential.ensure(cfg) not in (token, "cut short")
    explicit = Config(data_dir=str(tmp_path), http=HttpConfig(listen="127.0.0.1:9464", token="set-in-config"))
    assert credential.ensure(explicit) == credential.load(explicit) == "set-in-config"


def test_dashboard_command_prints_the_link_or_one_line(tmp_path, capsys):
    from nexus import config as config_mod
    from nexus.cli.commands import main

    path = tmp_path / "nexus.yaml"
    path.write_text("data_dir: ./var\nhttp: {listen: '0.0.0.0:9464', token: ''}\n")
    (tmp_path / "var").mkdir(mode=0o700)
    assert main(["dashboard", "-c", str(path)]) == ExitCode.CONFIG  # no pipeline started here yet
    assert capsys.readouterr().err.count("\n") == 1
    token = credential.ensure(config_mod.load(str(path), None))
    assert main(["dashboard", "-c", str(path)]) == 0
    out = capsys.readouterr().out
    assert f"dashboard: http://127.0.0.1:9464/?token={token}" in out  # a wildcard listen: on loopback
    assert 'targets: ["127.0.0.1:9464"]' in out and "credentials_file" in out
    assert main(["dashboard", "--token", "-c", str(path)]) == 0 and capsys.readouterr().out == token + "\n"
    path.write_text("data_dir: ./var\nhttp: {listen: ''}\n")
    assert main(["dashboard", "-c", str(path)]) == ExitCode.CONFIG
    assert "http.listen is off" in capsys.readouterr().err
