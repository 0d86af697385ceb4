"""System test: metrics of a real launched pipeline, gathered as the HTTP process does
(CoordClient.metrics + the launcher's status, merged and rendered by
nexus/http/exposition.py) and read back with prometheus_client's parser."""

from __future__ import annotations

import pytest
from conftest import recorder_group
from prometheus_client.parser import text_string_to_metric_families
from recorder import read_handled

from nexus import Producer, config
from nexus.errors import RejectedError
from nexus.http import exposition
from nexus.protocol.client import CoordClient
from nexus.protocol.curve import client_keys
from nexus.testing import wait_for

pytestmark = pytest.mark.system

GROUP = "rec"


class Scrape:
    """One parsed scrape: value(name, **labels), and the samples of a name."""

    def __init__(self, text: bytes):
        self.text = text
        self.samples: dict[str, list[tuple[dict, float]]] = {}
        for family in text_string_to_metric_families(text.decode()):
            for s in family.samples:
                self.samples.setdefault(s.name, []).append((s.labels, s.value))

    def value(self, metric: str, default: float | None = None, /, **labels: str) -> float:
        for got, value in self.samples.get(metric, []):
            if got == labels:
                return value
        if default is not None:
            return default
        raise KeyError(f"{metric}{labels} not in the scrape:\n{self.text.decode()}")

    def series(self, metric: str, /, **labels: str) -> list[tuple[dict, float]]:
        return [(got, v) for got, v in self.samples.get(metric, []) if labels.items() <= got.items()]


def scrape(p, cfg) -> Scrape:
    reply = CoordClient(cfg.coord, 3.0, curve=client_keys(cfg)).metrics()
    text, content_type = exposition.render(exposition.merge(reply, p.control("status")))
    assert content_type.startswith("text/plain")
    return Scrape(text)


def test_pipeline_metrics_count_what_happened(tmp_path, config_factory, launched):
    out = tmp_path / "out"
    # poisonable: records every event but those with "poison" (fails them: a retry, then a dead letter)
    group = recorder_group(out, options={"fixed": str(tmp_path / "never")}, retry={"attempts": 2, "backoff": ["0.1s"]})
    group["handler"] = "recorder:poisonable"
    path = config_factory(workers={GROUP: group})
    p = launched(path)
    cfg = config.load(path)
    p.wait_members(GROUP, 1)

    with Producer(cfg.confirm, source="src-a") as a:
        sent = [a.send("test.meal", {"i": i}, key=f"k{i % 5}") for i in range(150)]
        a.send("test.meal", {"poison": True})
        a.flush(20)
    with Producer(cfg.confirm, source="src-b") as b:
        sent += [b.send("test.other", {"i": i}) for i in range(50)]
        b.flush(20)
    c = Producer(cfg.confirm, source="src-b")
    try:
        c.send("nope.thing", {})  # not a contract, not allowed untyped: rejected
        with pytest.raises(RejectedError, match="unknown_type"):
            c.flush(20)
    finally:
        c.close()

    wait_for(lambda: len(read_handled(str(out))) >= len(sent), 30, message="every event handled")
    member = f"{GROUP}-0"

    gm = {"group": GROUP, "member": member}
    calls = 200 + 2  # the poison event: two attempts

    def settled() -> Scrape | None:
        s = scrape(p, cfg)  # a member's counts come with its next heartbeat
        return (
            s
            if (
                s.value("nexus_handler_outcomes_total", 0, outcome="dead_lettered", **gm) == 1
                and s.value("nexus_handler_outcomes_total", 0, outcome="ok", **gm) == 200
                and s.value("nexus_handler_duration_seconds_count", 0, **gm) == calls
                and s.value("nexus_event_latency_seconds_count", 0, **gm) == calls
                and s.value("nexus_group_lag_events", -1, group=GROUP) == 0
                and s.value("nexus_dead_letters", 0, group=GROUP) == 1
            )
            else None
        )

    s = wait_for(settled, 30, 0.2, "the dead letter stored and lag 0 in a scrape")
    handled = read_handled(str(out))
    assert sorted(r[1] for r in handled) == sorted(sent)  # nothing lost, nothing twice
    print(
        f"\nMETRICS-REPORT sent={len(sent) + 2} accepted={len(sent) + 1} rejected=1 handled={len(handled)} "
        f"dead_lettered=1 bytes={len(s.text)}"
    )

    # router: accepted and rejected by type and source
    assert s.value("nexus_events_accepted_total", type="test.meal", source="src-a") == 151
    assert s.value("nexus_events_accepted_total", type="test.other", source="src-b") == 50
    assert len(s.series("nexus_events_accepted_total")) == 2
    assert s.value("nexus_events_rejected_total", reason="unknown_type", type="nope.thing", source="src-b") == 1
    assert s.value("nexus_duplicates_dropped_total", stage="intake") == 0
    # journal
    assert s.value("nexus_journal_bytes") > 0 and s.value("nexus_journal_segments") >= 1
    assert s.value("nexus_journal_last_seq") == 201
    assert s.value("nexus_journal_append_seconds_count") >= 1
    assert s.value("nexus_storage_ok") == 1
    # lag 0 in every partition, cursors at the last event of each partition they saw
    partitions = s.series("nexus_partition_lag_events", group=GROUP)
    assert len(partitions) == cfg.workers[GROUP].partitions and all(v == 0 for _, v in partitions)
    assert max(v for _, v in s.series("nexus_partition_cursor", group=GROUP)) == 201
    assert s.value("nexus_fetches_total", group=GROUP) >= 1  # the member's first read of its partitions
    assert s.value("nexus_router_loop_lag_seconds_count") > 0
    # the member: outcomes, histograms consistent with them
    outcome = {o: s.value("nexus_handler_outcomes_total", outcome=o, **gm) for o in ("ok", "retried", "timed_out")}
    assert outcome == {"ok": 200, "retried": 1, "timed_out": 0}
    for hist in ("nexus_handler_duration_seconds", "nexus_event_latency_seconds"):
        assert s.value(f"{hist}_count", **gm) == calls
        buckets = sorted((float(labels["le"]), v) for labels, v in s.series(f"{hist}_bucket", **gm))
        counts = [v for _, v in buckets]
        assert counts == sorted(counts) and buckets[-1] == (float("inf"), calls)
        assert s.value(f"{hist}_sum", **gm) >= 0
    assert s.value("nexus_redeliveries_total", **gm) == 1  # the poison's second attempt
    assert s.value("nexus_breaker_state", **gm) == 0
    assert s.value("nexus_duplicates_dropped_total", stage="member", **gm) == 0
    # the launcher's
    assert s.value("nexus_process_up", name="router", role="router", group="") == 1
    assert s.value("nexus_process_up", name=member, role="worker", group=GROUP) == 1
    assert s.value("nexus_process_restarts_total", name=member, role="worker", group=GROUP) == 0
    assert s.value("nexus_group_members", group=GROUP) == 1
    assert s.value("nexus_ready") == 1
    # status output is as it was: the snapshot is not spread into member entries
    status = p.router_status()
    assert status is not None
    [entry] = status["groups"][GROUP]["members"]
    assert "counters" not in entry and "metrics" not in entry and entry["handled"] == 200

    # producers connected: a producer's connection counts while it is open
    d = Producer(cfg.confirm, source="src-d")
    try:
        d.send("test.meal", {"last": True})
        d.flush(20)
        wait_for(lambda: scrape(p, cfg).value("nexus_producers_connected") == 1, 10, 0.1, "one producer connected")
    finally:
        d.close()
    wait_for(lambda: scrape(p, cfg).value("nexus_producers_connected") == 0, 10, 0.1, "no producer connected")
