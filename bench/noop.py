"""The benchmark's no-op handler: counts events, no I/O per event.

`bench.noop:Counter` is instantiated once per member with the group's options:

    out:           directory for the result and progress files (required)
    group:         group name, used in file names
    sample_every:  record the latency of one event in this many (default 1)
    max_samples:   cap on latency samples kept (default 1,000,000)
    trace:         also keep `n` of each latency sample (bench/trace.py matches hops by it)

Per event it sets bit `payload["n"]` in a bitmap (a set bit already set counts
as a duplicate) and, for sampled events, records handler start minus `event.time`
(the producer's send time). A small daemon thread rewrites a progress file every
200 ms (when the count changed) so the harness can tell when everything was handled without polling the
router; `close()` (run when the member stops on SIGTERM) writes the full result
as msgpack: counts, the bitmap, latency samples, first and last handle times.
"""

from __future__ import annotations

import array
import os
import threading
import time

import msgspec

PROGRESS_EVERY = 0.2


def _write_atomic(path: str, data: bytes) -> None:
    tmp = f"{path}.tmp"
    with open(tmp, "wb") as f:
        f.write(data)
    os.replace(tmp, path)


class Counter:
    def __init__(self, options: dict):
        self.out = options["out"]
        self.group = options.get("group", "bench")
        self.sample_every = max(1, int(options.get("sample_every", 1)))
        self.max_samples = int(options.get("max_samples", 1_000_000))
        self.pid = os.getpid()
        self.count = 0
        self.duplicates = 0
        self.redelivered = 0
        self.bad = 0
        self.first = 0.0
        self.last = 0.0
        self.member = ""
        self.seen = bytearray(1 << 17)  # bitmap over payload["n"], grows on demand
        self.latency = array.array("d")
        self.sent_at = array.array("d")  # event.time of each latency sample
        self.trace_n = array.array("q") if options.get("trace") else None  # n of each sample
        self._countdown = self.sample_every
        self._stop = threading.Event()
        self._progress_path = os.path.join(self.out, f"progress-{self.group}-{self.pid}.json")
        self._thread = threading.Thread(target=self._progress, name="bench-progress", daemon=True)
        self._thread.start()

    def handle(self, event, ctx) -> None:
        now = time.time()
        if not self.count:
            self.first = now
            self.member = ctx.member
        self.last = now
        self.count += 1
        try:
            n = event.payload["n"]
        except (TypeError, KeyError):
            self.bad += 1
            return
        i = n >> 3
        seen = self.seen
        if i >= len(seen):
            seen.extend(bytes(max(i + 1 - len(seen), len(seen))))
        bit = 1 << (n & 7)
        if seen[i] & bit:
            self.duplicates += 1
            if ctx.redelivered:
                self.redelivered += 1
        else:
            seen[i] |= bit
        self._countdown -= 1
        if not self._countdown:
            self._countdown = self.sample_every
            if len(self.latency) < self.max_samples:
                self.latency.append(now - event.time)
                self.sent_at.append(event.time)
                if self.trace_n is not None:
                    self.trace_n.append(n)

    def _progress(self) -> None:
        written = -1
        while not self._stop.wait(PROGRESS_EVERY):
            if self.count != written:
                written = self.count
                self._write_progress()

    def _write_progress(self) -> None:
        try:
            _write_atomic(
                self._progress_path, msgspec.json.encode({"count": self.count, "last": self.last, "pid": self.pid})
            )
        except OSError:
            pass

    def close(self) -> None:
        self._stop.set()
        self._thread.join(2)
        self._write_progress()
        result = {
            "group": self.group,
            "member": self.member,
            "pid": self.pid,
            "count": self.count,
            "duplicates": self.duplicates,
            "redelivered": self.redelivered,
            "bad": self.bad,
            "first": self.first,
            "last": self.last,
            "sample_every": self.sample_every,
            "bitmap": bytes(self.seen),
            "latency": self.latency.tobytes(),
            "sent_at": self.sent_at.tobytes(),
        }
        if self.trace_n is not None:
            result["trace_n"] = self.trace_n.tobytes()
        _write_atomic(os.path.join(self.out, f"result-{self.group}-{self.pid}.msgpack"), msgspec.msgpack.encode(result))
