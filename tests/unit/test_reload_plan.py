"""The reload plan (nexus/supervisor/reloadplan.py): every kind of change, pure."""

from __future__ import annotations

import msgspec

from nexus import config
from nexus.config import Config, RateLimit, RateLimits, WorkerGroupConfig
from nexus.supervisor.reloadplan import plan, router_view


def cfg(**kw) -> Config:
    base = {
        "workers": {
            "a": WorkerGroupConfig(handler="m:f", processes=2),
            "b": WorkerGroupConfig(handler="m:g", processes=1, subscribe=["x.*"]),
        },
        "producers": {"tick": config.source_class("schedule").Config(kind="schedule", every=1.0)},
    }
    base.update(kw)
    return Config(**base)


def group(c: Config, name: str, **kw) -> Config:
    workers = dict(c.workers)
    workers[name] = msgspec.structs.replace(workers[name], **kw)
    return msgspec.structs.replace(c, workers=workers)


def test_nothing_changed_is_an_empty_plan():
    found = plan(cfg(), cfg())
    assert found.empty and found.changes() == [] and found.needs_restart == [] and not found.refused


def test_groups_added_removed_restarted_scaled_and_noted():
    old = cfg()
    workers = dict(old.workers)
    del workers["b"]
    workers["c"] = WorkerGroupConfig(handler="m:h", processes=3)
    new = msgspec.structs.replace(old, workers=workers)
    found = plan(old, new)
    assert [(g.group, g.action, g.processes) for g in found.groups] == [
        ("b", "removed", (1, 0)),
        ("c", "added", (0, 3)),
    ]
    assert found.changes() == [
        "group b: removed (its 1 member(s) drain and stop); its cursors are dropped; "
        "re-adding it starts by its `start` policy, not where it left off",
        "group c: added (3 processes)",
    ]
    options = plan(old, group(old, "a", options={"tag": "v2"}))
    assert [(g.action, g.fields, g.routing) for g in options.groups] == [("restart", ["options"], False)]
    assert options.changes() == ["group a: rolling restart for options"]
    both = plan(old, group(old, "a", handler="m:f2", processes=4, subscribe=["y.*"]))
    (change,) = both.groups
    assert change.action == "restart" and change.processes == (2, 4) and change.routing
    assert set(change.fields) == {"handler", "processes", "subscribe"}
    assert "processes 2 -> 4" in change.describe() and "routing changes" in change.describe()
    for field, value in (("retry", config.RetryConfig(attempts=9)), ("concurrency", 3), ("max_events", 10)):
        assert plan(old, group(old, "a", **{field: value})).groups[0].action == "restart", field
    scaled = plan(old, group(old, "a", processes=5))
    assert [(g.action, g.processes) for g in scaled.groups] == [("scale", (2, 5))]
    assert scaled.changes() == ["group a: processes 2 -> 5"]
    noted = plan(old, group(old, "a", start="earliest"))
    assert [g.action for g in noted.groups] == ["note"]


def test_a_partition_count_change_refuses_the_whole_reload():
    old = cfg()
    new = group(old, "a", partitions=8, options={"x": 1})
    found = plan(old, new)
    assert found.refused.startswith("cannot change workers.a.partitions 16 -> 8 live")
    assert "\n" not in found.refused and found.groups == []


def test_producers_added_removed_restarted():
    old = cfg()
    schedule = config.source_class("schedule").Config
    new = msgspec.structs.replace(
        old,
        producers={
            "tick": schedule(kind="schedule", every=2.0),
            "other": schedule(kind="schedule", every=1.0),
        },
    )
    assert plan(old, new).producers == {"tick": "restart", "other": "added"}
    assert plan(new, old).producers == {"tick": "restart", "other": "removed"}
    assert plan(new, old).changes() == ["producer other: removed", "producer tick: restart"]


def test_rate_limits_log_level_launcher_keys_and_what_needs_a_restart():
    old = cfg()
    new = msgspec.structs.replace(
        old,
        log=config.LogConfig(level="debug", format="json"),
        router=msgspec.structs.replace(
            old.router, rate_limits=RateLimits(default=RateLimit(rate=5, burst=5)), ingest="tcp://127.0.0.1:1"
        ),
        hang_timeout=config.Duration(9),
        data_dir="/elsewhere",
    )
    found = plan(old, new)
    assert found.rate_limits and found.log_level == ("info", "debug") and found.launcher == ["hang_timeout"]
    assert found.needs_restart == ["data_dir", "log.format", "router.ingest"]
    assert found.changes() == ["rate limits: applied", "log level: info -> debug", "hang_timeout: applied"]
    # what the running pipeline adopts: the live parts only
    adopted = config.adopt_live(old, new)
    assert adopted.log == config.LogConfig(level="debug", format="console")
    assert adopted.router.ingest == old.router.ingest and adopted.router.rate_limits == new.router.rate_limits
    assert adopted.data_dir == old.data_dir and adopted.hang_timeout == 9


def test_router_view_keeps_pending_groups_at_their_old_spec():
    old = cfg()
    new = group(old, "a", subscribe=["z.*"])
    workers = dict(new.workers)
    del workers["b"]
    new = msgspec.structs.replace(new, workers=workers)
    view = router_view(old, new, {"a", "b"})
    assert view.workers == old.workers
    assert router_view(old, new, {"b"}).workers == {"a": new.workers["a"], "b": old.workers["b"]}
    assert router_view(old, new, set()).workers == new.workers


def test_the_http_port_applies_live_by_restarting_its_process():
    from nexus.config import HttpConfig

    old = cfg(http=HttpConfig(listen="127.0.0.1:9464"))
    moved = plan(old, cfg(http=HttpConfig(listen="127.0.0.1:9465", token="t" * 40)))
    assert moved.http == "127.0.0.1:9465" and not moved.empty and "http" not in moved.needs_restart
    assert moved.changes() == ["http: the HTTP process restarts on 127.0.0.1:9465"]
    off = plan(old, cfg(http=HttpConfig(listen="")))
    assert off.http == "" and off.changes() == ["http: the HTTP process restarts off"]
    assert plan(old, old).http is None


def test_the_gateway_applies_live_by_restarting_its_process():
    from nexus.config import GatewayConfig, GatewayTlsConfig

    old = cfg(gateway=GatewayConfig(listen="127.0.0.1:8080"))
    moved = plan(old, cfg(gateway=GatewayConfig(listen="127.0.0.1:8081")))
    assert moved.gateway == "127.0.0.1:8081" and not moved.empty and not moved.needs_restart
    assert moved.changes() == ["gateway: the gateway restarts on 127.0.0.1:8081"]
    tls = plan(old, cfg(gateway=GatewayConfig(listen="127.0.0.1:8080", tls=GatewayTlsConfig("c.pem", "k.pem"))))
    assert tls.gateway == "127.0.0.1:8080" and not tls.needs_restart
    assert plan(old, cfg()).changes() == ["gateway: the gateway restarts off"]
    assert plan(old, old).gateway is None
