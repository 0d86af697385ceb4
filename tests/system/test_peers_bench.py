"""The peers benchmark's harnesses (bench/peer_redis.py, bench/peer_nats.py) against a real
redis-server and a real nats-server: every event the producer process sent is handled by
the consumer process exactly once, unpaced and paced. Counts only: how fast each peer
is, is measured by `python -m bench.peers`, never asserted here."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

REPO = str(Path(__file__).resolve().parents[2])
if REPO not in sys.path:  # bench/ is not an installed package: a bare `pytest` finds it too
    sys.path.insert(0, REPO)

from bench import peer_servers  # noqa: E402

MISSING = peer_servers.missing()


def _harness(peer: str):
    if peer == "redis":
        from bench.peer_redis import run_redis

        return peer_servers.RedisServer, run_redis
    from bench.peer_nats import run_nats

    return peer_servers.NatsServer, run_nats


@pytest.mark.parametrize("peer", ["redis", "nats"])
def test_every_event_sent_is_handled_once(peer):
    if peer in MISSING:
        pytest.skip(MISSING[peer])
    server_class, run = _harness(peer)
    with server_class() as server:
        unpaced = run(server.url, 2_000, 0.0, 30.0, 16, 30.0, 0.0)
        # paced 2,000/s for 1 s: the producer sends what is due and naps in between
        paced = run(server.url, 2_001, 2_000.0, 1.0, 16, 30.0, 0.0)
    assert unpaced["errors"] == [] and paced["errors"] == []
    assert unpaced["sent"] == unpaced["handled"] == 2_000
    assert 1_000 <= paced["sent"] == paced["handled"]
    for r in (unpaced, paced):
        assert (r["lost"], r["duplicates"]) == (0, 0), r
    # every handled event of the paced run was sampled (send -> handler start)
    assert paced["latency_ms"]["samples"] == paced["handled"]
