"""Producer.send end to end in fire mode: validation, id, encode, the lock, the I/O thread's
batching and the ZeroMQ send, against a PULL drained by another process (so the reader
takes no CPU from this one). Records wall time per event and, in extra_info, this
process's CPU per event (`cpu_per_event_ns`, the I/O threads included) and the average
batch size."""

from __future__ import annotations

import subprocess
import sys
import time

import pytest

from nexus import Producer

from .conftest import BATCH, PAD, per_event

EVENTS = 10 * BATCH  # per round

DRAIN = """
import sys, zmq
ctx = zmq.Context()
s = ctx.socket(zmq.PULL)
s.bind(sys.argv[1])
print("ready", flush=True)
while True:
    s.recv(copy=False)
"""


@pytest.fixture
def ingest(tmp_path):
    endpoint = f"ipc://{tmp_path}/ingest"
    proc = subprocess.Popen([sys.executable, "-c", DRAIN, endpoint], stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline().strip() == "ready"
        yield endpoint
    finally:
        proc.kill()
        proc.wait(10)


def test_producer_send_fire(benchmark, ingest):
    p = Producer(ingest, source="bench-0", confirm=False)
    send = p.send
    batches = [0]
    original = p._outbox.next_batch

    def next_batch(now):
        batch = original(now)
        batches[0] += batch is not None
        return batch

    p._outbox.next_batch = next_batch
    cpu = [0.0, 0]

    def run():
        c0 = time.process_time()
        for i in range(EVENTS):
            send("bench.event", {"n": i, "pad": PAD})
        p.flush(60)
        cpu[0] += time.process_time() - c0
        cpu[1] += EVENTS

    benchmark.pedantic(run, rounds=10, iterations=1, warmup_rounds=1)
    p.close(30)
    per_event(benchmark, EVENTS)
    benchmark.extra_info["cpu_per_event_ns"] = round(cpu[0] / cpu[1] * 1e9, 1)
    benchmark.extra_info["avg_batch"] = round(p.stats["sent"] / max(batches[0], 1), 1)
