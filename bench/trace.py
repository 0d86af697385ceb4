"""`python -m bench.pipeline --trace`: where the time of a single event goes, hop by hop.

Four timestamps per event (all `time.time()` on one host):

    make     `Producer.send` built the event (`event.time`, the latency's start)
    taken    the producer's outbox put it in a batch (`Outbox.next_batch`), just before
             the socket send; recorded in the producer process, with the thread that took it
             (the caller's `send`, or the I/O thread / sender task)
    tapped   a SUB socket of the benchmark's own (a thread in the harness) received the
             `Delivery` from the router's publish socket: the router's intake, journal write
             and publish, plus one SUB hop (the member's SUB gets the same message)
    handler  the no-op handler started (`bench.noop`, with `trace` on it records `n`)

so the hops are: producer (make -> taken), router (taken -> tapped) and member (tapped ->
handler). The report gives each hop's p50/p99 over all events and, for the slow events
(total above the run's p99), each hop's median and how often it was the largest.
The tap is one more process's worth of work on the machine only in trace mode.
"""

from __future__ import annotations

import array
import asyncio
import bisect
import threading
import time

import msgspec
import zmq

# -- producer side ---------------------------------------------------------------------------


def record_takes(producer, counter: list[int]) -> dict[str, array.array]:
    """Wrap the producer's Outbox.next_batch: per batch, (time taken, events taken so far,
    1 if the caller's thread took it). Returns the arrays, filled as the producer runs."""
    outbox = producer._outbox  # noqa: SLF001 - the benchmark's own probe
    original = outbox.next_batch
    caller = threading.main_thread().ident
    rec = {"t": array.array("d"), "upto": array.array("q"), "caller": array.array("b")}

    def next_batch(now):
        batch = original(now)
        if batch is not None:
            counter[0] += 1
            rec["t"].append(time.time())
            rec["upto"].append(outbox.sent_events)  # events taken so far, this batch included
            rec["caller"].append(1 if _by_caller(caller) else 0)
        return batch

    outbox.next_batch = next_batch
    return rec


def _by_caller(caller: int | None) -> bool:
    """The caller's thread, and (AsyncProducer) not its sender task."""
    if threading.get_ident() != caller:
        return False
    try:
        task = asyncio.current_task()
    except RuntimeError:  # no running loop: the sync producer's caller
        return True
    return task is None or getattr(task.get_coro(), "__name__", "") != "_sender"


def takes_to_result(rec: dict[str, array.array]) -> dict[str, bytes]:
    return {f"trace_{k}": v.tobytes() for k, v in rec.items()}


# -- the tap ---------------------------------------------------------------------------------


class _Delivery(msgspec.Struct, array_like=True):
    prev: int
    seqs: list[int]
    events: list[msgspec.Raw]


class _Event(msgspec.Struct):
    payload: dict


class Tap:
    """A SUB on the router's publish socket in a thread: receive time of every event n."""

    def __init__(self, endpoint: str, prefix: bytes = b"bench"):
        self.endpoint = endpoint
        self.prefix = prefix
        self.at: dict[int, float] = {}
        self._stop = threading.Event()
        self._ready = threading.Event()
        self._thread = threading.Thread(target=self._run, name="bench-tap", daemon=True)

    def start(self) -> Tap:
        self._thread.start()
        self._ready.wait(5)
        return self

    def stop(self) -> dict[int, float]:
        self._stop.set()
        self._thread.join(5)
        return self.at

    def _run(self) -> None:
        ctx = zmq.Context.instance()
        sock = ctx.socket(zmq.SUB)
        sock.setsockopt(zmq.RCVHWM, 0)
        sock.setsockopt(zmq.SUBSCRIBE, self.prefix)
        sock.connect(self.endpoint)
        self._ready.set()
        delivery = msgspec.msgpack.Decoder(_Delivery)
        event = msgspec.msgpack.Decoder(_Event)
        at = self.at
        try:
            while not self._stop.is_set():
                if not sock.poll(100):
                    continue
                while True:
                    try:
                        frames = sock.recv_multipart(zmq.NOBLOCK)
                    except zmq.Again:
                        break
                    now = time.time()
                    for raw in delivery.decode(frames[-1]).events:
                        n = event.decode(raw).payload.get("n")
                        if isinstance(n, int) and n not in at:
                            at[n] = now
        finally:
            sock.close(linger=0)


# -- analysis ----------------------------------------------------------------------------------


def _pct(values: list[float], q: float) -> float:
    if not values:
        return 0.0
    values = sorted(values)
    return round(values[min(len(values) - 1, max(0, int(q / 100 * len(values) + 0.5) - 1))] * 1000, 3)


def analyze(
    prod_results: list[dict], member_results: list[dict], tapped: dict[int, float], producers: int, warm: float
):
    """Per-hop figures (ms) for the events the handler sampled (see the module docstring)."""
    takes = {}
    caller_batches = batches = 0
    for r in prod_results:
        if "trace_t" not in r:
            continue
        t, upto, caller = array.array("d"), array.array("q"), array.array("b")
        t.frombytes(r["trace_t"])
        upto.frombytes(r["trace_upto"])
        caller.frombytes(r["trace_caller"])
        takes[r["idx"]] = (t, upto, caller)
        batches += len(caller)
        caller_batches += sum(caller)
    rows = []  # (total, producer, router, member, by caller)
    for r in member_results:
        if "trace_n" not in r:
            continue
        ns, lat, sent = array.array("q"), array.array("d"), array.array("d")
        ns.frombytes(r["trace_n"])
        lat.frombytes(r["latency"])
        sent.frombytes(r["sent_at"])
        for n, x, make in zip(ns, lat, sent, strict=False):
            if make < warm or n not in tapped:
                continue
            idx = n % producers
            if idx not in takes:
                continue
            t, upto, caller = takes[idx]
            k = bisect.bisect_right(upto, n // producers)  # the batch that took the k-th event
            if k >= len(t):
                continue
            # the tap is a thread of the (loaded) harness: when it ran later than the
            # member, the member's own receive is the better bound for the router's hop
            tap = min(tapped[n], make + x)
            rows.append((x, t[k] - make, tap - t[k], make + x - tap, caller[k]))
    if not rows:
        return {}
    hops = ("producer", "router", "member")
    out: dict = {"events": len(rows), "batches": batches, "caller_batches": caller_batches}
    for i, hop in enumerate(hops, start=1):
        vals = [row[i] for row in rows]
        out[hop] = {"p50": _pct(vals, 50), "p99": _pct(vals, 99), "p999": _pct(vals, 99.9)}
    limit = sorted(row[0] for row in rows)[int(0.99 * len(rows))]
    slow = [row for row in rows if row[0] >= limit]
    out["slow"] = {
        "count": len(slow),
        "over_ms": round(limit * 1000, 3),
        "by_caller": sum(row[4] for row in slow),
    }
    for i, hop in enumerate(hops, start=1):
        out["slow"][hop] = {
            "p50": _pct([row[i] for row in slow], 50),
            "largest": sum(1 for row in slow if max(row[1:4]) == row[i]),
        }
    return out


def print_trace(trace: dict) -> None:
    if not trace:
        print("  trace          no traced events")
        return
    print(
        f"  trace          {trace['events']:,} events; {trace['batches']:,} batches, "
        f"{trace['caller_batches']:,} taken by the caller's send"
    )
    for hop in ("producer", "router", "member"):
        h = trace[hop]
        print(f"    {hop:<9} p50 {h['p50']:.3f}  p99 {h['p99']:.3f}  p99.9 {h['p999']:.3f} ms")
    s = trace["slow"]
    print(f"    slowest 1% ({s['count']} events over {s['over_ms']} ms; {s['by_caller']} taken by the caller):")
    for hop in ("producer", "router", "member"):
        print(f"      {hop:<9} median {s[hop]['p50']:.3f} ms, largest hop in {s[hop]['largest']}")
