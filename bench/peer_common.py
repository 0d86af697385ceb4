"""What the Redis Streams and NATS JetStream harnesses share.

The work is the Nexus benchmark's (bench/pipeline.py): one producer process sends
`count` events, unpaced or paced at `rate`/s, each the same envelope as a Nexus event
(baselines.RawEvent: type, source, payload {"n": n, "pad": "x" * size}, id, send time)
encoded with msgspec; one consumer process decodes each and hands it to a no-op handler
(Tally) that marks n in a bitmap (lost and duplicates by event) and records the latency
send -> handler start. An end marker after the last event tells the consumer to stop.

`run_pair` spawns the two processes (spawn method, like the baselines), starts the clock
when both are connected, and is bounded in time; every process is joined or killed
before it returns.
"""

from __future__ import annotations

import array
import multiprocessing
import queue
import time

import msgspec

from .baselines import EVENT_TYPE, RawEvent, _finish, _mark, count_loss

END_TYPE = "bench.end"  # the marker after the last event; not counted
PACE_NAP = 0.0002  # the Nexus bench producer's nap between paced sends (bench/pipeline.py)


class EventMaker:
    """Encodes event i of a producer: the Nexus bench payload, the send time taken now."""

    def __init__(self, size: int, source: str = "bench-0"):
        self.enc = msgspec.msgpack.Encoder()
        self.pad = "x" * size
        self.source = source
        self.prefix = f"{source}-"

    def __call__(self, n: int) -> bytes:
        return self.enc.encode(
            RawEvent(EVENT_TYPE, self.source, {"n": n, "pad": self.pad}, f"{self.prefix}{n:020x}", time.time())
        )

    def end(self) -> bytes:
        return self.enc.encode(RawEvent(END_TYPE, self.source, None, f"{self.prefix}end", time.time()))


class Pacer:
    """Which events are due: unpaced, the next `batch`; paced, those whose time has come
    (rate * elapsed), at most `batch` at once; bounded by `count` and `seconds`."""

    def __init__(self, count: int, rate: float, seconds: float, batch: int):
        self.count, self.rate, self.seconds, self.batch = count, rate, seconds, batch
        self.t0 = self.end = 0.0

    def start(self) -> None:
        self.t0 = time.monotonic()
        self.end = self.t0 + self.seconds

    def due(self, i: int) -> int:
        """The index to send up to (exclusive); == i: wait PACE_NAP; -1: done."""
        now = time.monotonic()
        if i >= self.count or now >= self.end:
            return -1
        stop = min(self.count, i + self.batch)
        if self.rate:
            stop = min(stop, int((now - self.t0) * self.rate) + 1)
        return max(stop, i)


class Tally:
    """The no-op handler: counts, marks n, keeps handler start - send time per event."""

    def __init__(self) -> None:
        self.dec = msgspec.msgpack.Decoder(RawEvent)
        self.seen = bytearray(1 << 17)
        self.count = self.duplicates = self.bad = 0
        self.first = self.last = 0.0
        self.latency = array.array("d")
        self.sent_at = array.array("d")
        self.ended = False

    def handle(self, data: bytes) -> None:
        now = time.time()
        ev = self.dec.decode(data)
        if ev.type == END_TYPE:
            self.ended = True
            return
        if not self.count:
            self.first = now
        self.last = now
        self.count += 1
        try:
            n = ev.payload["n"]
        except (TypeError, KeyError):
            self.bad += 1
            return
        if _mark(self.seen, n):
            self.duplicates += 1
        self.latency.append(now - ev.time)
        self.sent_at.append(ev.time)

    def result(self, error: str = "") -> dict:
        return {
            "role": "consumer",
            "count": self.count,
            "duplicates": self.duplicates,
            "bad": self.bad,
            "ended": self.ended,
            "first": self.first,
            "last": self.last,
            "bitmap": bytes(self.seen),
            "latency": self.latency.tobytes(),
            "sent_at": self.sent_at.tobytes(),
            "cpu": time.process_time(),
            "error": error,
        }


def producer_result(sent: int, t_first: float, t_last: float, error: str = "") -> dict:
    return {
        "role": "producer",
        "sent": sent,
        "t_first": t_first,
        "t_last": t_last,
        "cpu": time.process_time(),
        "error": error,
    }


# -- the parent's side ----------------------------------------------------------------------
def run_pair(
    name: str, producer, producer_args: tuple, consumer, consumer_args: tuple, timeout: float, warmup: float
) -> dict:
    """Spawn consumer(*consumer_args, results, timeout) and producer(*producer_args, go,
    results, timeout); each puts {"ready": role} once connected, then its result."""
    mp = multiprocessing.get_context("spawn")
    results, go = mp.Queue(), mp.Event()
    procs = [
        mp.Process(target=consumer, args=(*consumer_args, results, timeout), daemon=True),
        mp.Process(target=producer, args=(*producer_args, go, results, timeout), daemon=True),
    ]
    got: dict[str, dict] = {}
    errors: list[str] = []
    try:
        for p in procs:
            p.start()
        ready: set[str] = set()
        deadline = time.monotonic() + 60
        while len(ready) < 2:
            msg = _get(results, deadline, procs)
            if msg is None:
                raise RuntimeError(f"{name}: only {sorted(ready)} connected within 60 s")
            if "ready" in msg:
                ready.add(msg["ready"])
            else:
                raise RuntimeError(f"{name}: {msg.get('error') or msg}")
        go.set()
        deadline = time.monotonic() + timeout + 10
        while len(got) < 2:
            msg = _get(results, deadline, procs)
            if msg is None:
                errors.append(f"{name}: {sorted({'producer', 'consumer'} - set(got))} did not report")
                break
            got[msg["role"]] = msg
    finally:
        go.set()
        _finish(procs)
    return summarize(name, got.get("producer", {}), got.get("consumer", {}), warmup, errors)


def _get(results, deadline: float, procs: list) -> dict | None:
    while time.monotonic() < deadline:
        try:
            return results.get(timeout=0.2)
        except queue.Empty:
            if not any(p.is_alive() for p in procs):
                try:
                    return results.get(timeout=0.5)
                except queue.Empty:
                    return None
    return None


def summarize(name: str, prod: dict, cons: dict, warmup: float, errors: list[str]) -> dict:
    from .pipeline import percentiles

    errors = errors + [r["error"] for r in (prod, cons) if r.get("error")]
    sent = prod.get("sent", 0)
    t_first = prod.get("t_first", 0.0)
    loss = count_loss([cons["bitmap"]], [sent]) if cons.get("bitmap") is not None else {}
    if cons and not cons.get("ended"):
        errors.append(f"{name}: the consumer never saw the end marker")
    elapsed = cons.get("last", 0.0) - t_first if cons.get("last") and t_first else 0.0
    latency, sent_at = array.array("d"), array.array("d")
    latency.frombytes(cons.get("latency", b""))
    sent_at.frombytes(cons.get("sent_at", b""))
    warm = t_first + warmup  # as the Nexus run: events sent in the first `warmup` s are not sampled
    samples = [x for x, t in zip(latency, sent_at, strict=True) if t >= warm]
    return {
        "name": name,
        "sent": sent,
        "handled": cons.get("count", 0),
        "events_per_s": round(loss.get("unique", 0) / elapsed) if elapsed > 0 else 0,
        "elapsed_s": round(elapsed, 3),
        "send_window_s": round(prod.get("t_last", 0.0) - t_first, 3) if t_first else 0.0,
        "lost": loss.get("lost", sent),
        "duplicates": cons.get("duplicates", 0),
        "latency_ms": percentiles(samples),
        "cpu_s": {"producer": round(prod.get("cpu", 0.0), 3), "consumer": round(cons.get("cpu", 0.0), 3)},
        "errors": errors,
    }
