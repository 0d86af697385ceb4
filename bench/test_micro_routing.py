"""Router hot path: key hash, route lookup, intake (decode + validate + journal entry) and commit
(journal append + partition streams + publish encode), per batch of BATCH events."""

from __future__ import annotations

import pytest

from nexus.config import RateLimits
from nexus.protocol.events import Contracts, encode
from nexus.protocol.partitions import key_hash, partition_of
from nexus.protocol.wire import ProducerBatch, encoder
from nexus.router.intake import Intake
from nexus.router.ratelimit import RateLimiter
from nexus.router.routing import RouteTable

from .conftest import BATCH, make_event, per_event


def test_key_hash(benchmark):
    benchmark(key_hash, "bench-0")


def test_route_and_partition(benchmark):
    table = RouteTable({"bench0": (["bench.*"], 16), "other": (["file.*"], 16)})
    h = key_hash("k42")

    def route():
        return [partition_of(h, r.partitions) for r in table.routes("bench.event")]

    benchmark(route)


def _intake() -> Intake:
    return Intake(Contracts(("bench.*",)), RateLimiter(RateLimits()), 2**20, 5000)


def test_intake_fire_batch(benchmark, raw_events):
    """Router: one fire-mode batch: decode envelope, validate, key hash, encode journal entry."""
    frame = encoder.encode(ProducerBatch([__import__("msgspec").Raw(r) for r in raw_events]))
    intake = _intake()
    benchmark(intake.take, frame, False, 0.0)
    per_event(benchmark, BATCH)


def test_intake_confirm_batch(benchmark, raw_events):
    """Router: one confirm-mode batch (dedup state per producer)."""
    import msgspec

    intake = _intake()
    state = {"seq": 1}

    def take():
        frame = encoder.encode(
            ProducerBatch([msgspec.Raw(r) for r in raw_events], "p" * 32, state["seq"], state["seq"])
        )
        state["seq"] += len(raw_events)
        return intake.take(frame, True, 0.0)

    benchmark(take)
    per_event(benchmark, BATCH)


def test_intake_typed_batch(benchmark, raw_typed_events):
    """Router: one batch of contract-typed events (file.created)."""
    import msgspec

    frame = encoder.encode(ProducerBatch([msgspec.Raw(r) for r in raw_typed_events]))
    intake = Intake(Contracts(()), RateLimiter(RateLimits()), 2**20, 5000)
    benchmark(intake.take, frame, False, 0.0)
    per_event(benchmark, BATCH)


class _NullSocket:
    def __init__(self):
        self.sent = 0

    def send_multipart(self, frames, flags=0):
        self.sent += 1


@pytest.fixture
def router(bench_config):
    from nexus.router.server import Router

    r = Router(bench_config)
    r.recover()
    r.publish = _NullSocket()
    yield r
    r.journal.close()


@pytest.mark.parametrize("keys", [1, 64])
def test_router_commit_batch(benchmark, router, raw_events, keys):
    """Router._commit: journal append (fsync never) + group/partition streams + Delivery encode.
    keys=1: the whole batch is one partition stream; keys=64: spread over 16 partitions."""
    import msgspec

    raws = [encode(make_event(i, key=f"k{i % keys}")) for i in range(BATCH)] if keys > 1 else raw_events
    frame = encoder.encode(ProducerBatch([msgspec.Raw(r) for r in raws]))
    acc = router.intake.take(frame, False, 0.0).accepted
    benchmark(router._commit, [acc])
    per_event(benchmark, BATCH)


@pytest.mark.parametrize("size", [50, BATCH])
def test_router_ingest_batch(benchmark, router, raw_events, size):
    """Router._on_ingest + the commit of one loop turn: the whole per-message router cost
    of fire mode, minus recv/poll. size=50: a lightly loaded producer's batch; size=BATCH:
    what a producer under sustained load sends (it naps 1 ms between batches)."""
    import msgspec

    frame = encoder.encode(ProducerBatch([msgspec.Raw(r) for r in raw_events[:size]]))

    def ingest_and_commit():
        router._on_ingest([frame])
        router._commit_staged()

    benchmark(ingest_and_commit)
    per_event(benchmark, size)


def test_router_fetch_dense_partition(benchmark, router, raw_events):
    """Router.fetch of 2000 events (fetch_limit) from a journal of 120,000 records where every
    record is in the fetched partition: the catch-up path of a member that fell behind."""
    import msgspec

    from nexus.protocol.partitions import key_hash
    from nexus.protocol.wire import Fetch

    frame = encoder.encode(ProducerBatch([msgspec.Raw(r) for r in raw_events]))
    for _ in range(120):
        router._on_ingest([frame])
        router._commit_staged()
    group = router.coordinator.groups["bench0"]
    p = key_hash("bench-0") % group.partitions
    msg = Fetch(group="bench0", member="bench0-0", partition=p, after=10_000, limit=2000)
    records = benchmark.pedantic(router.fetch, args=(group, msg), rounds=5, iterations=1)
    assert len(records.seqs) == 2000
    per_event(benchmark, 2000)


def test_router_lag_with_backlog(benchmark, router, raw_events):
    """Router.lag() with 120,000 unacked events: every status reply (nexus status,
    LaunchedPipeline.wait_members, the launcher's readiness check) computes it per group;
    it is kept incrementally (nexus/router/backlog.py), one bisect per partition, and exact
    (it read up to 20,000 journal records in the router loop and said '>=20000' before)."""
    import msgspec

    frame = encoder.encode(ProducerBatch([msgspec.Raw(r) for r in raw_events]))
    for _ in range(120):
        router._on_ingest([frame])
        router._commit_staged()
    group = router.coordinator.groups["bench0"]
    lag = benchmark.pedantic(router.lag, args=(group,), rounds=3, iterations=1)
    assert lag == 120 * len(raw_events)
