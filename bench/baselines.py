"""The two baselines `python -m bench.pipeline` compares Nexus against.

Both do the same work as the Nexus run (same event count, same payload
{"n": i, "pad": "x" * size}, the same Event fields, events counted in a bitmap
by a consumer process) without validation, journal, acks or coordination:

* raw_zmq: producer processes PUSH msgspec-encoded batches of MAX_BATCH_EVENTS
  events -> a "router" process PULLs, decodes the batch envelope and PUBlishes it
  re-encoded as a delivery -> a subscriber process SUBs, decodes every event into
  a struct and counts it. The ceiling for Python on ZeroMQ with msgspec.
* mpqueue: producer processes put one dict per event on a multiprocessing.Queue
  -> a middle process gets and puts on a second Queue -> a consumer process gets
  and counts. What people write by hand.

Every process is started with the spawn method, every run is bounded in count
and in time, and every process is joined or killed before a function returns.
"""

from __future__ import annotations

import multiprocessing
import os
import queue
import shutil
import tempfile
import time
from typing import Any

import msgspec

from nexus.producer.outbox import MAX_BATCH_EVENTS

EVENT_TYPE = "bench.event"
SEND_HWM = 1_000_000  # raw chain: enough that PUB never drops in a bounded run


class RawEvent(msgspec.Struct, frozen=True, omit_defaults=True):
    """The same envelope as nexus.Event, decoded loosely (no Meta bounds)."""

    type: str
    source: str
    payload: Any
    id: str
    time: float
    key: str | None = None
    priority: int = 5
    correlation_id: str | None = None
    v: int = 1


class RawBatch(msgspec.Struct, array_like=True):
    events: list[msgspec.Raw]


class RawDelivery(msgspec.Struct, array_like=True):
    seq: int
    events: list[msgspec.Raw]


def _n(idx: int, i: int, producers: int) -> int:
    return idx + i * producers


def _mark(seen: bytearray, n: int) -> bool:
    """Set bit n; True if it was already set."""
    i = n >> 3
    if i >= len(seen):
        seen.extend(bytes(max(i + 1 - len(seen), len(seen))))
    bit = 1 << (n & 7)
    if seen[i] & bit:
        return True
    seen[i] |= bit
    return False


# -- raw pyzmq chain -------------------------------------------------------------------
def _raw_producer(idx: int, producers: int, endpoint: str, count: int, seconds: float, size: int, go, results) -> None:
    import zmq

    ctx = zmq.Context()
    sock = ctx.socket(zmq.PUSH)
    sock.setsockopt(zmq.SNDHWM, 100_000)
    sock.setsockopt(zmq.LINGER, 5000)
    sock.connect(endpoint)
    enc = msgspec.msgpack.Encoder()
    pad = "x" * size
    source = f"bench-{idx}"
    prefix = f"{os.getpid():08x}-{idx:04x}-"
    go.wait(30)
    t_first = time.time()
    end = time.monotonic() + seconds
    batch: list[msgspec.Raw] = []
    i = 0
    while i < count:
        ev = RawEvent(EVENT_TYPE, source, {"n": _n(idx, i, producers), "pad": pad}, f"{prefix}{i:020x}", time.time())
        batch.append(msgspec.Raw(enc.encode(ev)))
        i += 1
        if len(batch) >= MAX_BATCH_EVENTS:
            sock.send(enc.encode(RawBatch(batch)))
            batch = []
            if time.monotonic() >= end:
                break
    if batch:
        sock.send(enc.encode(RawBatch(batch)))
    sock.send(b"")  # end marker
    t_last = time.time()
    sock.close()
    ctx.term()
    results.put({"idx": idx, "sent": i, "t_first": t_first, "t_last": t_last, "cpu": time.process_time()})


def _raw_router(pull_ep: str, pub_ep: str, producers: int, ready, results, timeout: float) -> None:
    import zmq

    ctx = zmq.Context()
    pull = ctx.socket(zmq.PULL)
    pull.setsockopt(zmq.RCVHWM, 100_000)
    pull.bind(pull_ep)
    pub = ctx.socket(zmq.XPUB)
    pub.setsockopt(zmq.SNDHWM, SEND_HWM)
    pub.bind(pub_ep)
    # wait for the subscriber instead of sleeping (pyzmq examples/pubsub/publisher.py)
    if not pub.poll(int(timeout * 1000)):
        results.put({"role": "router", "error": "no subscriber"})
        return
    pub.recv()
    ready.set()
    dec = msgspec.msgpack.Decoder(RawBatch)
    enc = msgspec.msgpack.Encoder()
    ended = 0
    seq = 0
    deadline = time.monotonic() + timeout
    while ended < producers and time.monotonic() < deadline:
        if not pull.poll(200):
            continue
        frame = pull.recv()
        if not frame:
            ended += 1
            continue
        batch = dec.decode(frame)
        seq += len(batch.events)
        pub.send_multipart((b"bench/0", enc.encode(RawDelivery(seq, batch.events))))
    pub.send_multipart((b"bench/0", b""))
    results.put({"role": "router", "cpu": time.process_time()})
    time.sleep(0.2)
    pull.close(0)
    pub.close(2000)
    ctx.term()


def _raw_consumer(sub_ep: str, results, timeout: float) -> None:
    import zmq

    ctx = zmq.Context()
    sub = ctx.socket(zmq.SUB)
    sub.setsockopt(zmq.RCVHWM, SEND_HWM)
    sub.connect(sub_ep)
    sub.setsockopt(zmq.SUBSCRIBE, b"bench/")
    dec = msgspec.msgpack.Decoder(RawDelivery)
    ev_dec = msgspec.msgpack.Decoder(RawEvent)
    seen = bytearray(1 << 17)
    count = dups = 0
    last = 0.0
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not sub.poll(200):
            continue
        _topic, body = sub.recv_multipart()
        if not body:
            break
        for raw in dec.decode(body).events:
            ev = ev_dec.decode(raw)
            count += 1
            if _mark(seen, ev.payload["n"]):
                dups += 1
        last = time.time()
    results.put(
        {
            "role": "consumer",
            "count": count,
            "duplicates": dups,
            "last": last,
            "bitmap": bytes(seen),
            "cpu": time.process_time(),
        }
    )
    sub.close(0)
    ctx.term()


# -- multiprocessing.Queue chain ----------------------------------------------------------
def _mpq_producer(idx: int, producers: int, q, count: int, seconds: float, size: int, go, results) -> None:
    pad = "x" * size
    source = f"bench-{idx}"
    prefix = f"{os.getpid():08x}-{idx:04x}-"
    go.wait(30)
    t_first = time.time()
    end = time.monotonic() + seconds
    i = 0
    while i < count:
        q.put(
            {
                "type": EVENT_TYPE,
                "source": source,
                "payload": {"n": _n(idx, i, producers), "pad": pad},
                "id": f"{prefix}{i:020x}",
                "time": time.time(),
            }
        )
        i += 1
        if not i % 1000 and time.monotonic() >= end:
            break
    q.put(None)
    t_last = time.time()
    results.put({"idx": idx, "sent": i, "t_first": t_first, "t_last": t_last, "cpu": time.process_time()})
    q.close()
    q.join_thread()


def _mpq_middle(q_in, q_out, producers: int, ready, results, timeout: float) -> None:
    ready.set()
    ended = 0
    deadline = time.monotonic() + timeout
    while ended < producers and time.monotonic() < deadline:
        try:
            ev = q_in.get(timeout=0.2)
        except queue.Empty:
            continue
        if ev is None:
            ended += 1
            continue
        q_out.put(ev)
    q_out.put(None)
    results.put({"role": "router", "cpu": time.process_time()})
    q_out.close()
    q_out.join_thread()


def _mpq_consumer(q, ready, results, timeout: float) -> None:
    ready.set()
    seen = bytearray(1 << 17)
    count = dups = 0
    last = 0.0
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            ev = q.get(timeout=0.2)
        except queue.Empty:
            continue
        if ev is None:
            break
        count += 1
        if _mark(seen, ev["payload"]["n"]):
            dups += 1
        last = time.time()
    results.put(
        {
            "role": "consumer",
            "count": count,
            "duplicates": dups,
            "last": last,
            "bitmap": bytes(seen),
            "cpu": time.process_time(),
        }
    )


# -- running them ------------------------------------------------------------------------
def expected_bitmap(sent: list[int]) -> int:
    """Bits n = idx + i * P for i < sent[idx], as an int (bit n = event n)."""
    producers = len(sent)
    if not sent:
        return 0
    low = min(sent)
    value = (1 << (low * producers)) - 1
    for i in range(low, max(sent)):
        for idx, s in enumerate(sent):
            if i < s:
                value |= 1 << _n(idx, i, producers)
    return value


def count_loss(bitmaps: list[bytes], sent: list[int]) -> dict:
    union = 0
    distinct_sum = 0
    for bm in bitmaps:
        v = int.from_bytes(bm, "little")
        distinct_sum += v.bit_count()
        union |= v
    expected = expected_bitmap(sent)
    return {
        "unique": union.bit_count(),
        "lost": (expected & ~union).bit_count(),
        "unexpected": (union & ~expected).bit_count(),
        "cross_duplicates": distinct_sum - union.bit_count(),
    }


def _collect(procs: list, results, want: int, timeout: float) -> list[dict]:
    out: list[dict] = []
    deadline = time.monotonic() + timeout
    while len(out) < want and time.monotonic() < deadline:
        try:
            out.append(results.get(timeout=0.2))
        except queue.Empty:
            if not any(p.is_alive() for p in procs):
                try:
                    out.append(results.get(timeout=0.5))
                except queue.Empty:
                    break
    return out


def _finish(procs: list) -> None:
    for p in procs:
        p.join(5)
    for p in procs:
        if p.is_alive():
            p.kill()
            p.join(5)


def _summarize(name: str, prod: list[dict], others: list[dict], producers: int) -> dict:
    router = next((r for r in others if r.get("role") == "router"), {})
    consumer = next((r for r in others if r.get("role") == "consumer"), {})
    sent = [0] * producers
    for r in prod:
        sent[r["idx"]] = r["sent"]
    total = sum(sent)
    first = min((r["t_first"] for r in prod), default=0.0)
    last = consumer.get("last", 0.0)
    count = consumer.get("count", 0)
    loss = count_loss([consumer["bitmap"]], sent) if consumer.get("bitmap") is not None else {}
    elapsed = last - first if last and first else 0.0
    return {
        "name": name,
        "sent": total,
        "handled": count,
        "events_per_s": round(loss.get("unique", count) / elapsed) if elapsed > 0 else 0,
        "elapsed_s": round(elapsed, 3),
        "lost": loss.get("lost", total),
        "duplicates": consumer.get("duplicates", 0),
        "cpu_s": {
            "producers": round(sum(r["cpu"] for r in prod), 3),
            "router": round(router.get("cpu", 0.0), 3),
            "consumer": round(consumer.get("cpu", 0.0), 3),
        },
        "error": router.get("error", "") or ("" if consumer else "consumer did not report"),
    }


def run_raw_zmq(count: int, producers: int, size: int, seconds: float, timeout: float) -> dict:
    """count events per producer, at most `seconds` of sending, everything within `timeout`."""
    mp = multiprocessing.get_context("spawn")
    tmp = tempfile.mkdtemp(prefix="nexus-bench-raw-")
    pull_ep, pub_ep = f"ipc://{tmp}/pull", f"ipc://{tmp}/pub"
    results, go, ready = mp.Queue(), mp.Event(), mp.Event()
    procs = [
        mp.Process(target=_raw_router, args=(pull_ep, pub_ep, producers, ready, results, timeout)),
        mp.Process(target=_raw_consumer, args=(pub_ep, results, timeout)),
    ]
    prods = [
        mp.Process(target=_raw_producer, args=(i, producers, pull_ep, count, seconds, size, go, results))
        for i in range(producers)
    ]
    try:
        for p in procs + prods:
            p.start()
        if not ready.wait(30):
            raise RuntimeError("raw_zmq baseline: router saw no subscriber")
        go.set()
        got = _collect(procs + prods, results, producers + 2, timeout + 10)
        prod = [r for r in got if "idx" in r]
        return _summarize("raw_zmq", prod, [r for r in got if "role" in r], producers)
    finally:
        go.set()
        _finish(prods + procs)
        shutil.rmtree(tmp, ignore_errors=True)


def run_mpqueue(count: int, producers: int, size: int, seconds: float, timeout: float) -> dict:
    mp = multiprocessing.get_context("spawn")
    q1, q2 = mp.Queue(maxsize=100_000), mp.Queue(maxsize=100_000)
    results, go, ready_mid, ready_cons = mp.Queue(), mp.Event(), mp.Event(), mp.Event()
    procs = [
        mp.Process(target=_mpq_middle, args=(q1, q2, producers, ready_mid, results, timeout)),
        mp.Process(target=_mpq_consumer, args=(q2, ready_cons, results, timeout)),
    ]
    prods = [
        mp.Process(target=_mpq_producer, args=(i, producers, q1, count, seconds, size, go, results))
        for i in range(producers)
    ]
    try:
        for p in procs + prods:
            p.start()
        if not (ready_mid.wait(30) and ready_cons.wait(30)):
            raise RuntimeError("mpqueue baseline: middle or consumer did not start")
        go.set()
        got = _collect(procs + prods, results, producers + 2, timeout + 10)
        prod = [r for r in got if "idx" in r]
        return _summarize("mpqueue", prod, [r for r in got if "role" in r], producers)
    finally:
        go.set()
        _finish(prods + procs)
