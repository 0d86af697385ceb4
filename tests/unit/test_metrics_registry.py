"""Unit tests for the metrics registry (nexus/common/metrics.py), the intake's counts, the
member's snapshot, and the exposition (nexus/http/exposition.py), parsed back with
prometheus_client's own parser."""

from __future__ import annotations

import asyncio
import math
import re
import time
from pathlib import Path

import msgspec
import pytest
from conftest import write_config
from prometheus_client.parser import text_string_to_metric_families

from nexus import config
from nexus.common import metricnames as names
from nexus.common.metrics import CAP, OTHER, SERIES_CAP, Registry
from nexus.config import RateLimits
from nexus.http import exposition
from nexus.protocol.events import Contracts, Event, encode, new_id
from nexus.protocol.wire import Assign, Delivery, ProducerBatch, Records, encoder, topic
from nexus.router.intake import Intake
from nexus.router.ratelimit import RateLimiter

REPO = Path(__file__).resolve().parents[2]


def parse(text: bytes) -> dict[str, dict[tuple, float]]:
    """sample name -> {sorted label items: value}."""
    out: dict[str, dict[tuple, float]] = {}
    for family in text_string_to_metric_families(text.decode()):
        for s in family.samples:
            out.setdefault(s.name, {})[tuple(sorted(s.labels.items()))] = s.value
    return out


# -- registry ---------------------------------------------------------------------------
def test_counter_gauge_histogram_snapshot_format():
    reg = Registry()
    c = reg.counter("c_total", ("a",))
    c.inc(("x",))
    c.inc(("x",), 2)
    c.inc(("y",))
    g = reg.gauge("g")
    g.set(7.5)
    h = reg.histogram("h_seconds", (0.1, 1.0), ("k",))
    for v in (0.05, 0.1, 0.5, 3.0):
        h.observe(v, ("z",))
    snap = reg.snapshot()
    assert snap["counters"]["c_total"] == [[{"a": "x"}, 3], [{"a": "y"}, 1]]
    assert snap["gauges"]["g"] == [[{}, 7.5]]
    [[labels, hist]] = snap["histograms"]["h_seconds"]
    assert labels == {"k": "z"}
    # le is inclusive (0.1 falls in the 0.1 bucket), cumulative, the last one +Inf
    assert hist["buckets"] == [[0.1, 2], [1.0, 3], [math.inf, 4]]
    assert hist["count"] == 4 and hist["sum"] == pytest.approx(3.65)
    # msgpack-able as it is (it crosses the coord socket in heartbeats and replies)
    assert msgspec.msgpack.decode(msgspec.msgpack.encode(snap)) == snap


def test_collect_callbacks_run_before_each_snapshot():
    reg = Registry()
    g = reg.gauge("lag", ("group",))
    state = {"a": 3}
    reg.on_collect(lambda: g.replace({(k,): float(v) for k, v in state.items()}))
    assert reg.snapshot()["gauges"]["lag"] == [[{"group": "a"}, 3.0]]
    state.clear()
    state["b"] = 1
    assert reg.snapshot()["gauges"]["lag"] == [[{"group": "b"}, 1.0]]  # a gone series ends


def test_capped_labels_count_past_the_cap_under_other():
    reg = Registry()
    c = reg.counter("events_total", ("reason", "type"), capped=("type",))
    for i in range(CAP + 50):
        c.inc(("contract", f"t.{i}"))
        c.inc(("contract", f"t.{i}"))  # a known value stays itself
    c.inc(("rate", "t.0"))  # seen before: itself, under any other label
    c.inc(("rate", "t.999"))
    values = {tuple(labels.values()): v for labels, v in reg.snapshot()["counters"]["events_total"]}
    assert len({t for _, t in values}) == CAP + 1  # CAP values and "other"
    assert values[("contract", OTHER)] == 2 * 50
    assert values[("contract", "t.0")] == 2 and values[("rate", "t.0")] == 1
    assert values[("rate", OTHER)] == 1
    assert reg.snapshot()["counters"]["events_total"] == reg.snapshot()["counters"]["events_total"]


def test_label_tuples_past_the_series_cap_read_other():
    reg = Registry()
    c = reg.counter("accepted_total", ("type", "source"), capped=("type", "source"))
    for t in range(100):
        for src in range(100):  # each value under CAP, but 10,000 tuples
            c.inc((f"t.{t}", f"s{src}"))
    values = dict(c.values)
    assert len(values) == SERIES_CAP + 1
    assert values[(OTHER, OTHER)] == 100 * 100 - SERIES_CAP
    assert values[("t.0", "s0")] == 1  # an old tuple still counts as itself


def test_wrong_label_count_and_double_registration_are_errors():
    reg = Registry()
    c = reg.counter("x_total", ("a",))
    with pytest.raises(ValueError, match="labels"):
        c.inc(("a", "b"))
    with pytest.raises(ValueError, match="twice"):
        reg.gauge("x_total")


# -- intake -------------------------------------------------------------------------------
def ev(type_: str, source: str, payload=None) -> msgspec.Raw:
    return msgspec.Raw(encode(Event(type=type_, source=source, payload=payload or {}, id=new_id(), time=1.0)))


def test_intake_counts_accepted_per_type_and_source_once_journaled():
    intake = Intake(Contracts(untyped=["test.*"]), RateLimiter(RateLimits()), 2000, 100)
    events = [ev("test.a", "s1"), ev("test.a", "s1"), ev("test.b", "s1"), ev("test.a", "s2"), ev("test.a", "s1")]
    events.append(msgspec.Raw(msgspec.msgpack.encode({"not": "an event"})))  # malformed
    events.append(ev("nope.x", "s3"))  # an unknown type: not allowed untyped
    out = intake.take(encoder.encode(ProducerBatch(events, "p", 1, 1)), True, 0.0)
    assert out.accepted.counts == {("test.a", "s1"): 3, ("test.b", "s1"): 1, ("test.a", "s2"): 1}
    assert intake.accepted_by.values == {}  # not journaled yet
    intake.journaled([out.accepted])
    assert intake.accepted_by.values == {("test.a", "s1"): 3, ("test.b", "s1"): 1, ("test.a", "s2"): 1}
    assert intake.rejected_by.values == {("malformed", "", ""): 1, ("unknown_type", "nope.x", "s3"): 1}
    intake.storage_refused([out.accepted], "storage_unavailable", "disk full")
    assert intake.rejected_by.values[("storage_unavailable", "test.a", "s1")] == 3
    assert intake.rejected["storage_unavailable"] == 5


# -- member snapshot ------------------------------------------------------------------------
def test_member_snapshot_reads_the_member_counts(tmp_path):
    from nexus.member.breaker import OPEN
    from nexus.member.runtime import Member

    cfg = config.load(write_config(tmp_path, workers={"g": {"handler": "x:y", "subscribe": ["test.*"]}}))
    member = Member(cfg, "g", "g-1", handle=lambda event, ctx: None)
    member.scheduler.handled = 5
    member.outcomes.retried = 2
    member.scheduler.duration.observe(0.002)
    member.breaker.state = OPEN
    snap = member.telemetry.snapshot()
    outcomes = {labels["outcome"]: v for labels, v in snap["counters"][names.OUTCOMES]}
    assert outcomes == {"ok": 5, "retried": 2, "dead_lettered": 0, "timed_out": 0}
    assert snap["gauges"][names.BREAKER] == [[{}, 2]]
    assert snap["histograms"][names.HANDLER_DURATION][0][1]["count"] == 1
    assert set(snap["counters"]) | set(snap["gauges"]) | set(snap["histograms"]) <= set(names.CATALOGUE)


# -- exposition ---------------------------------------------------------------------------
def router_and_member() -> dict:
    router = Registry()
    router.counter(names.ACCEPTED, ("type", "source")).inc(("test.a", 'we"ird\nsrc'), 4)
    router.counter(names.DUPLICATES, ("stage",)).set(1, ("intake",))
    router.histogram(names.JOURNAL_APPEND, (0.001, 0.01)).observe(0.005)
    member = Registry()
    member.counter(names.OUTCOMES, ("outcome",)).set(9, ("ok",))
    member.counter(names.DUPLICATES, ("stage",)).set(2, ("member",))
    h = member.histogram(names.HANDLER_DURATION, (0.1, 1.0))
    h.observe(0.05)
    h.observe(2.0)
    return {"router": router.snapshot(), "members": {"g/g-1": member.snapshot()}}


def test_render_parses_back_with_the_values_labels_and_help():
    launcher = {
        "ok": True,
        "ready": True,
        "launcher": {"pid": 1},
        "processes": [
            {"name": "router", "role": "router", "group": "", "state": "running", "restarts": 2},
            {"name": "g-1", "role": "worker", "group": "g", "state": "running", "restarts": 0},
            {"name": "g-2", "role": "worker", "group": "g", "state": "backoff", "restarts": 3},
        ],
    }
    text, content_type = exposition.render(exposition.merge(router_and_member(), launcher))
    assert content_type.startswith("text/plain")
    got = parse(text)
    assert got["nexus_events_accepted_total"] == {(("source", 'we"ird\nsrc'), ("type", "test.a")): 4}
    assert got["nexus_duplicates_dropped_total"] == {
        (("stage", "intake"),): 1,
        (("group", "g"), ("member", "g-1"), ("stage", "member")): 2,
    }
    assert got["nexus_handler_outcomes_total"] == {(("group", "g"), ("member", "g-1"), ("outcome", "ok")): 9}
    gm = (("group", "g"), ("member", "g-1"))
    buckets = got["nexus_handler_duration_seconds_bucket"]
    assert buckets[tuple(sorted((*gm, ("le", "0.1"))))] == 1
    assert buckets[tuple(sorted((*gm, ("le", "+Inf"))))] == 2
    assert got["nexus_handler_duration_seconds_count"][gm] == 2
    assert got["nexus_journal_append_seconds_count"][()] == 1
    assert got["nexus_process_restarts_total"][(("group", ""), ("name", "router"), ("role", "router"))] == 2
    assert got["nexus_process_up"][(("group", "g"), ("name", "g-2"), ("role", "worker"))] == 0
    assert got["nexus_group_members"] == {(("group", "g"),): 1}
    assert got["nexus_group_members_desired"] == {(("group", "g"),): 2}
    assert got["nexus_ready"] == {(): 1}
    for family in text_string_to_metric_families(text.decode()):
        name = family.name + ("_total" if family.type == "counter" else "")
        assert family.documentation == names.CATALOGUE[name].help


def test_scale_and_autoscale_keys_are_rendered_when_present():
    launcher = {
        "processes": [{"name": "g-1", "role": "worker", "group": "g", "state": "running", "restarts": 0}],
        "ready": False,
        "scale": {"g": 3},
        "autoscale": {"g": {"min": 1, "max": 4, "decisions": {"up": 2, "down": 1}}},
    }
    got = parse(exposition.render(exposition.merge(None, launcher))[0])
    assert got["nexus_group_members_desired"] == {(("group", "g"),): 3}
    assert got["nexus_autoscale_decisions_total"] == {
        (("direction", "up"), ("group", "g")): 2,
        (("direction", "down"), ("group", "g")): 1,
    }
    assert got["nexus_ready"] == {(): 0}


def test_nothing_answering_renders_an_empty_page_and_bad_member_series_are_left_out():
    assert exposition.render(exposition.merge(None, None))[0] == b""
    reply = router_and_member()
    reply["members"]["g/g-2"] = {
        "counters": {names.OUTCOMES: [["not a pair"], [{"outcome": "ok"}, "NaNx"], [{"outcome": "ok"}, 1]]},
        "gauges": "nope",
        "histograms": {names.HANDLER_DURATION: [[{}, {"buckets": "x"}]]},
    }
    got = parse(exposition.render(exposition.merge(reply, None))[0])
    assert got["nexus_handler_outcomes_total"][(("group", "g"), ("member", "g-2"), ("outcome", "ok"))] == 1
    assert (("group", "g"), ("member", "g-2")) not in got["nexus_handler_duration_seconds_count"]


def test_operations_doc_and_readme_list_every_metric_and_no_other():
    for doc, heading in (("docs/operations.md", "## Metrics"), ("README.md", "## Operating Nexus")):
        text = (REPO / doc).read_text()
        section = text.split(heading, 1)[1].split("\n## ", 1)[0]
        listed = set(re.findall(r"`(nexus_[a-z_]+)", section))
        assert listed >= set(names.CATALOGUE), (doc, sorted(set(names.CATALOGUE) - listed))
        assert listed <= set(names.CATALOGUE), (doc, sorted(listed - set(names.CATALOGUE)))


class _Coord:
    def send(self, data: bytes):
        done = asyncio.get_running_loop().create_future()
        done.set_result(None)
        return done


class _Sub:
    def setsockopt(self, *args) -> None:
        pass


class _Heartbeat:
    started = True


def test_member_histograms_put_each_call_in_its_bucket(tmp_path):
    """Sync dispatch observes inline (with a cached latency bucket): events that waited
    ~20 s, ~0 s and "-100 s" (a producer clock ahead: counted as 0), interleaved."""
    from nexus.member.runtime import Member

    cfg = config.load(write_config(tmp_path, workers={"g": {"handler": "x:y", "subscribe": ["test.*"]}}))
    member = Member(cfg, "g", "g-1", handle=lambda event, ctx: None)
    loop = asyncio.new_event_loop()
    member.loop = loop
    member.coord, member.sub, member.heartbeat = _Coord(), _Sub(), _Heartbeat()  # type: ignore[assignment]
    now = time.time()
    ages = [20.0] * 5 + [0.0] * 5 + [-100.0] * 3 + [20.0] * 2 + [0.0]
    raws = [
        msgspec.Raw(encode(Event(type="test.a", source="s", payload={}, id=new_id(), time=now - age))) for age in ages
    ]
    frame = encoder.encode(Delivery(0, list(range(1, len(raws) + 1)), raws))

    async def run():
        member._on_assign(Assign(group="g", partitions=[0], grants={0: 0}))
        member._on_records(Records(group="g", partition=0, after=0, upto=0, seqs=[], events=[]))
        dispatcher = asyncio.ensure_future(member._dispatcher())
        member._on_delivery([topic("g", 0), frame])
        while member.partitions.queued:
            await asyncio.sleep(0)
        dispatcher.cancel()
        await asyncio.gather(dispatcher, return_exceptions=True)

    try:
        loop.run_until_complete(run())
    finally:
        loop.close()
    hist = dict(member.telemetry.snapshot()["histograms"])
    [[_, latency]] = hist[names.EVENT_LATENCY]
    per_bucket = dict(latency["buckets"])
    assert latency["count"] == len(ages) == member.scheduler.handled
    assert per_bucket[0.001] >= 3  # the clamped ones, at 0
    assert per_bucket[10.0] == 6 + 3  # the recent ones and the clamped
    assert per_bucket[30.0] - per_bucket[10.0] == 7  # the ones 20 s old
    assert 7 * 20 <= latency["sum"] < 7 * 20 + 5  # the clamped ones add 0, not -100
    [[_, duration]] = hist[names.HANDLER_DURATION]
    assert duration["count"] == len(ages) and duration["buckets"][-1][1] == len(ages)
