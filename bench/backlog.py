"""Member memory with a backlog: a slow handler under a paced load, its RSS and queue each second.

    python -m bench.backlog                                # 50,000 events/s for 60 s, handler sleeps 1 ms per event
    python -m bench.backlog --rate 50000 --duration 60 --delay-ms 1 --catch-up
    python -m bench.backlog --max-in-flight 10000 --json

A real `python -m nexus.launch` process group, one group of one member (by default) whose
handler (`bench.backlog:Slow`, the no-op counter of bench/noop.py plus a nap) sleeps
`--delay-ms` per event for the first `--slow-for` seconds it runs, then runs at full speed.
The producer sends far more than the member handles, so the backlog grows; it must grow in
the journal (the group's lag), not in the member's memory. Every second it prints the
member's and the router's RSS, the member's queued events (from its heartbeat stats, as
`nexus status` shows them), what it handled, and the group's lag.

With --catch-up it then waits (bounded by --catch-up-timeout) until the member, now fast,
has handled every event sent: the member reads what it dropped from the journal. It then
checks the handler's bitmap event by event: lost, duplicates (flagged as redelivered or not).
"""

from __future__ import annotations

import argparse
import json
import math
import multiprocessing
import os
import queue
import sys
import tempfile
import time
from pathlib import Path

import yaml

from nexus.testing import LaunchedPipeline

from . import baselines
from .noop import Counter
from .pipeline import child_env, proc_sample, producer_main, read_progress, read_results, stop_run, write_config


class Slow(Counter):
    """bench.noop's Counter that naps `delay_ms` per event during its first `slow_for`
    seconds (from its first event), then runs at full speed."""

    def __init__(self, options: dict):
        super().__init__(options)
        self.delay = float(options.get("delay_ms", 1.0)) / 1000
        self.slow_for = float(options.get("slow_for", 60.0))
        self.slow_until = 0.0
        self.trace_at = float(options.get("trace_at", 0))  # --trace-memory: seconds from the first event

    def handle(self, event, ctx) -> None:
        if not self.slow_until:
            self.slow_until = time.monotonic() + self.slow_for
            self.trace_at = self.trace_at and time.monotonic() + self.trace_at
        if self.trace_at and time.monotonic() >= self.trace_at:
            self.trace_at = 0.0
            self._trace_memory()
        if self.delay and time.monotonic() < self.slow_until:
            time.sleep(self.delay)
        super().handle(event, ctx)

    def _trace_memory(self) -> None:
        """Where the member's Python memory is (PYTHONTRACEMALLOC is set for the run): the
        traced total against RSS, and the biggest allocation sites."""
        import tracemalloc

        from nexus.member.limits import rss_bytes

        if not tracemalloc.is_tracing():
            return
        snap = tracemalloc.take_snapshot()
        traced = tracemalloc.get_traced_memory()[0]
        lines = [f"traced {traced / 2**20:.1f} MB of RSS {rss_bytes() / 2**20:.1f} MB"]
        lines += [str(stat) for stat in snap.statistics("lineno")[:15]]
        with open(os.path.join(self.out, f"trace-{self.pid}.txt"), "w") as f:
            f.write("\n".join(lines) + "\n")


def configure(tmp: Path, args) -> Path:
    args.groups, args.scrape_metrics, args.fsync, args.fsync_interval_ms = 1, None, "interval", 50
    path = write_config(tmp, args)
    cfg = yaml.safe_load(path.read_text())
    group = cfg["workers"]["bench0"]
    group["handler"] = "bench.backlog:Slow"
    group["options"].update(delay_ms=args.delay_ms, slow_for=args.slow_for, trace_at=args.trace_memory)
    if args.max_in_flight_bytes:
        group["max_in_flight_bytes"] = args.max_in_flight_bytes
    path.write_text(yaml.safe_dump(cfg))
    return path


def member_stats(status: dict | None) -> tuple[dict, object]:
    if not status:
        return {}, None
    g = status["groups"].get("bench0") or {}
    members = g.get("members") or []
    return (members[0] if members else {}), g.get("lag")


def run(args) -> dict:
    tmp = Path(tempfile.mkdtemp(prefix="nexus-backlog-"))
    out = tmp / "out"
    env = child_env()
    if args.trace_memory:
        env["PYTHONTRACEMALLOC"] = "1"
    pipeline = LaunchedPipeline(str(configure(tmp, args)), env=env)
    mp = multiprocessing.get_context("spawn")
    prods: list = []
    try:
        pipeline.start(wait_ready=True, timeout=60)
        pipeline.wait_members("bench0", args.members, timeout=60)
        pids = {p["name"]: p["pid"] for p in pipeline.processes() if p["pid"]}
        member_pids = {n: pid for n, pid in pids.items() if n.startswith("bench0")}
        per_producer = math.ceil(args.rate * args.duration / args.producers) + 1
        results, go = mp.Queue(), mp.Event()
        prods = [
            mp.Process(
                target=producer_main,
                daemon=True,
                args=(
                    i,
                    args.producers,
                    pipeline.cfg.ingest,
                    False,
                    per_producer,
                    args.duration,
                    args.rate / args.producers,
                    args.size,
                    args.keys,
                    20_000,
                    go,
                    results,
                    "sleep",
                    False,
                ),
            )
            for i in range(args.producers)
        ]
        for p in prods:
            p.start()
        for _ in prods:
            msg = results.get(timeout=60)
            if "ready" not in msg:
                raise RuntimeError(msg.get("error") or f"unexpected producer message {msg}")

        series: list[dict] = []
        t0 = time.monotonic()
        go.set()
        prod_results: list[dict] = []

        def sample(phase: str) -> dict:
            status = pipeline.router_status(2.0)
            stats, lag = member_stats(status)
            row: dict = {"t": round(time.monotonic() - t0, 1), "phase": phase, "lag": lag}
            for name, pid in {"router": pids["router"], **member_pids}.items():
                s = proc_sample(pid)
                row[f"{name}_rss_mb"] = round(s["rss"] / 2**20, 1) if s else None
                row[f"{name}_cpu_s"] = round(s["cpu"], 2) if s else None
            row["queued"] = stats.get("queued")
            row["handled"] = sum(read_progress(out).values())
            series.append(row)
            if not args.json:
                print(
                    f"  {row['t']:>6.1f}s {phase:<8} member {row.get(next(iter(member_pids)) + '_rss_mb')!s:>6} MB"
                    f"  router {row['router_rss_mb']!s:>6} MB  queued {row['queued']!s:>7}"
                    f"  handled {row['handled']:>9,}  lag {lag}",
                    file=sys.stderr,
                    flush=True,
                )
            return row

        next_t = t0 + args.interval
        while len(prod_results) < len(prods):
            try:
                prod_results.append(results.get(timeout=max(0.01, next_t - time.monotonic())))
                continue
            except queue.Empty:
                pass
            sample("sending")
            next_t += args.interval
            if time.monotonic() - t0 > args.duration + 120:
                raise RuntimeError("producers did not finish within 120 s of the end")
        errors = [r["error"] for r in prod_results if r.get("error")]
        sent = [0] * args.producers
        for r in prod_results:
            sent[r["idx"]] = r["sent"]
        total = sum(sent)

        caught_up = None
        if args.catch_up:
            deadline = time.monotonic() + args.catch_up_timeout
            caught_up = False
            while time.monotonic() < deadline:
                time.sleep(max(0.0, next_t - time.monotonic()))
                next_t += args.interval
                if sample("catch-up")["handled"] >= total:
                    caught_up = True
                    break
            if not caught_up:
                errors.append(f"catch-up timeout: handled {sum(read_progress(out).values())} of {total}")
        pipeline.stop(60)
        summary: dict = {"sent": total, "errors": errors, "caught_up": caught_up, "series": series}
        rs = read_results(out)
        if rs:
            loss = baselines.count_loss([r["bitmap"] for r in rs], sent)
            dups = sum(r["duplicates"] for r in rs) + loss["cross_duplicates"]
            flagged = sum(r["redelivered"] for r in rs)
            summary.update(
                handled=sum(r["count"] for r in rs),
                unique=loss["unique"],
                lost=loss["lost"] if caught_up else None,  # not caught up: the rest is in the journal
                not_yet_handled=loss["lost"],
                duplicates=dups,
                duplicates_flagged=flagged,
                duplicates_unflagged=dups - flagged,
            )
        for name in member_pids:
            rss = [r[f"{name}_rss_mb"] for r in series if r.get(f"{name}_rss_mb") is not None]
            summary[f"{name}_rss_mb"] = {"peak": max(rss, default=None), "end": rss[-1] if rss else None}
        queued = [r["queued"] for r in series if r.get("queued") is not None]
        summary["queued_peak"] = max(queued, default=None)
        rss = [r["router_rss_mb"] for r in series if r.get("router_rss_mb") is not None]
        summary["router_rss_mb"] = {"peak": max(rss, default=None), "end": rss[-1] if rss else None}
        summary["loadavg"] = os.getloadavg()
        summary["memory_trace"] = [f.read_text() for f in out.glob("trace-*.txt")]
        return summary
    finally:
        stop_run(prods, pipeline, tmp, args.keep)


def parse_args(argv=None):
    ap = argparse.ArgumentParser(prog="python -m bench.backlog", description=__doc__.split("\n\n")[0])
    ap.add_argument("--rate", type=float, default=50_000, help="total events/s, paced (default 50,000)")
    ap.add_argument("--duration", type=float, default=60.0, help="seconds of sending (default 60)")
    ap.add_argument("--delay-ms", type=float, default=1.0, help="handler nap per event while slow (default 1 ms)")
    ap.add_argument("--slow-for", type=float, default=0, help="seconds the handler is slow (default: --duration)")
    ap.add_argument("--producers", type=int, default=1)
    ap.add_argument("--members", type=int, default=1)
    ap.add_argument("--partitions", type=int, default=16)
    ap.add_argument("--keys", type=int, default=64, help="distinct partition keys (default 64)")
    ap.add_argument("--size", type=int, default=16, help="bytes of padding in the payload")
    ap.add_argument("--max-in-flight", type=int, default=0, help="per member (default: config default)")
    ap.add_argument("--max-in-flight-bytes", default="", help="per member, e.g. 16MiB (default: config default)")
    ap.add_argument("--retain", default="7d", help="journal retention")
    ap.add_argument("--interval", type=float, default=1.0, help="sampling period (s)")
    ap.add_argument(
        "--trace-memory",
        type=float,
        default=0,
        metavar="S",
        help="tracemalloc in the processes; the member's biggest allocation sites S seconds into the run",
    )
    ap.add_argument("--catch-up", action="store_true", help="then wait until every event was handled; count loss")
    ap.add_argument("--catch-up-timeout", type=float, default=300.0)
    ap.add_argument("--log-level", default="warning", choices=("debug", "info", "warning", "error"))
    ap.add_argument("--keep", action="store_true", help="keep the temp dir (config, journal, logs)")
    ap.add_argument("--json", action="store_true", help="print a JSON summary instead of the table")
    args = ap.parse_args(argv)
    if not args.slow_for:
        args.slow_for = args.duration
    args.sample_every = 1000  # latency is not what this measures
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    summary = run(args)
    if args.json:
        print(json.dumps(summary))
    else:
        keys = [k for k in summary if k != "series"]
        for k in keys:
            print(f"{k:>22}: {summary[k]}")
    return 1 if summary["errors"] else 0


if __name__ == "__main__":
    sys.exit(main())
