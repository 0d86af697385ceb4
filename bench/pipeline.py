"""End-to-end benchmark: a real `python -m nexus.launch` process group with no-op handlers.

    python -m bench.pipeline                               # fire mode, 10 s, 1 producer, 1 group, 1 member
    python -m bench.pipeline --mode confirm --fsync always
    python -m bench.pipeline --rate 10000 --no-baselines  # latency at a paced rate
    python -m bench.pipeline --rate 50000 --duration 300 --retain 30s --no-baselines   # RSS growth
    python -m bench.pipeline --json                        # machine-readable summary on stdout
    python -m bench.pipeline --curve --mode confirm --no-baselines   # tcp with CURVE against tcp without
    python -m bench.pipeline --scrape-metrics --no-baselines   # with a metrics scrape every second
    python -m bench.pipeline --scrape-metrics=both --repeat 3 --no-baselines   # runs without and with, alternating
    python -m bench.pipeline --engine nats                 # embedded vs NATS 1 node vs 3 nodes (bench/engines.py)

For one run it reports events/s end to end (first send to last handler start),
latency (producer send -> handler start) p50/p99/p999, CPU and peak RSS of the
router and members, lost and duplicate counts, the launcher's time to ready; then
it runs two baselines doing the same work (bench/baselines.py: a raw pyzmq chain
and a multiprocessing.Queue chain) and prints the ratios.

Every run is bounded in count and time; the pipeline is always stopped and the
temp dir removed (unless --keep).
"""

from __future__ import annotations

import argparse
import array
import json
import math
import multiprocessing
import os
import queue
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import msgspec
import yaml

from nexus.producer.outbox import MAX_BATCH_EVENTS
from nexus.testing import LaunchedPipeline, free_port

from . import baselines
from . import trace as bench_trace
from .scrape import TOKEN as SCRAPE_TOKEN
from .scrape import Scraper

REPO = str(Path(__file__).resolve().parent.parent)
EVENT_TYPE = "bench.event"
CLK_TCK = os.sysconf("SC_CLK_TCK")
DEFAULT_MAX_PER_PRODUCER = 20_000_000


# -- config ------------------------------------------------------------------------------
def write_config(directory: Path, args) -> Path:
    out = directory / "out"
    out.mkdir(parents=True, exist_ok=True)
    groups = {}
    for g in range(args.groups):
        name = f"bench{g}"
        groups[name] = {
            "handler": "bench.noop:Counter",
            "subscribe": ["bench.*"],
            "processes": args.members,
            "partitions": args.partitions,
            "start": "earliest",
            "retry": {"attempts": 1, "backoff": ["0.1s"]},
            "options": {
                "out": str(out),
                "group": name,
                "sample_every": args.sample_every,
                "trace": bool(getattr(args, "trace", False)),
            },
        }
        if args.max_in_flight:
            groups[name]["max_in_flight"] = args.max_in_flight
    router = {
        "ingest": "ipc://{data_dir}/run/ingest",
        "confirm": "ipc://{data_dir}/run/confirm",
        "journal": {"fsync": args.fsync, "fsync_interval_ms": args.fsync_interval_ms, "retain": args.retain},
    }
    security: dict = {}
    variant = getattr(args, "variant", "ipc")
    if variant != "ipc":  # every router endpoint on loopback TCP, as a remote host would use
        router.update({name: f"tcp://127.0.0.1:{free_port()}" for name in ("ingest", "confirm", "publish", "coord")})
    if variant == "tcp+curve":  # the router's key pair; the launched member and the producers use it too
        import zmq.auth

        keys = directory / "keys"
        (keys / "authorized").mkdir(parents=True, exist_ok=True)
        _, secret = zmq.auth.create_certificates(str(keys), "router")
        os.chmod(secret, 0o600)  # a secret file others can read is refused
        security = {"curve": {"secret_key_file": secret, "authorized_keys_dir": str(keys / "authorized")}}
    cfg = {
        "data_dir": "./var",
        "log": {"level": args.log_level, "format": "console"},
        "router": router,
        "security": security,
        "contracts": ["nexus.contracts"],
        "contracts_untyped": ["bench.*"],
        # no HTTP process unless scraped (then on a free port, scraped as Prometheus would)
        "http": (
            {"listen": f"127.0.0.1:{free_port()}", "token": SCRAPE_TOKEN}
            if args.scrape_metrics == "on"
            else {"listen": ""}
        ),
        "shutdown_timeout": "20s",
        "producers": {},
        "workers": groups,
        # engine: nats and its `nats` section when bench/engines.py runs on a cluster
        **getattr(args, "engine_overrides", {}),
    }
    path = directory / "nexus.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


# -- /proc sampling ------------------------------------------------------------------------
def proc_sample(pid: int) -> dict | None:
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(") ", 1)[1].split()
        with open(f"/proc/{pid}/status") as f:
            status = {line.split(":", 1)[0]: line.split(":", 1)[1].strip() for line in f if ":" in line}
    except (FileNotFoundError, ProcessLookupError, IndexError):
        return None
    kb = lambda key: int(status.get(key, "0 kB").split()[0]) * 1024
    return {
        "cpu": (int(fields[11]) + int(fields[12])) / CLK_TCK,  # utime + stime
        "rss": kb("VmRSS"),
        "hwm": kb("VmHWM"),
        "t": time.monotonic(),
    }


def host_cpu() -> tuple[float, float]:
    """(busy seconds, total seconds) summed over all CPUs, from /proc/stat."""
    with open("/proc/stat") as f:
        fields = [int(x) for x in f.readline().split()[1:]]
    idle = fields[3] + fields[4]  # idle + iowait
    total = sum(fields[:8])  # up to steal
    return (total - idle) / CLK_TCK, total / CLK_TCK


class Sampler:
    """Samples CPU time and RSS of the pipeline's processes every `interval` seconds."""

    def __init__(self, pids: dict[str, int], interval: float):
        self.pids = pids
        self.interval = interval
        self.series: dict[str, list[dict]] = {name: [] for name in pids}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def sample(self) -> dict[str, dict]:
        now = {}
        for name, pid in self.pids.items():
            s = proc_sample(pid)
            if s is not None:
                self.series[name].append(s)
                now[name] = s
        return now

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            self.sample()

    def start(self) -> Sampler:
        self.host_start = host_cpu()
        self.sample()
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(5)
        self.sample()
        self.host_end = host_cpu()

    def host_busy_cores(self) -> float:
        """Average number of busy CPUs on the host over the sampled window (all processes)."""
        busy = self.host_end[0] - self.host_start[0]
        total = self.host_end[1] - self.host_start[1]
        return round(busy / total * (os.cpu_count() or 1), 2) if total > 0 else 0.0

    def rss_at(self, name: str, seconds: float) -> int | None:
        series = self.series.get(name) or []
        if not series:
            return None
        t0 = series[0]["t"]
        for s in series:
            if s["t"] - t0 >= seconds:
                return s["rss"]
        return None


# -- producers -----------------------------------------------------------------------------
def producer_main(
    idx: int,
    producers: int,
    endpoint: str,
    confirm: bool,
    count: int,
    seconds: float,
    rate: float,
    size: int,
    keys: int,
    window: int,
    go,
    results,
    pacing: str = "sleep",
    use_async: bool = False,
    trace: bool = False,
) -> None:
    """One producer process: nexus.Producer (or AsyncProducer), `count` events or `seconds`,
    paced when rate > 0. Pacing "sleep" naps 0.2 ms while ahead of the rate; "busy" spins
    on the clock instead, as a caller computing between sends does (never releasing the
    interpreter lock voluntarily)."""
    result = {"idx": idx, "sent": 0, "t_first": 0.0, "t_last": 0.0, "error": ""}
    run = (idx, producers, endpoint, confirm, count, seconds, rate, size, keys, window, go, results, pacing)
    try:
        if use_async:
            import asyncio

            asyncio.run(_produce_async(*run, result, trace))
        else:
            _produce_sync(*run, result, trace)
    except BaseException as exc:  # reported, never raised past the process
        result["error"] = f"producer {idx}: {type(exc).__name__}: {exc}"
    results.put(result)


def _pace(i: int, count: int, start: float, now: float, rate: float) -> int:
    """The index to send up to now: all due events when paced, else the next 500."""
    if rate > 0:
        return min(count, int((now - start) * rate) + 1)
    return min(count, i + 500)


def _produce_sync(
    idx, producers, endpoint, confirm, count, seconds, rate, size, keys, window, go, results, pacing, result, trace
) -> None:
    from nexus import Producer

    p = Producer(endpoint, source=f"bench-{idx}", confirm=confirm, window=window)
    batches = [0]
    takes = bench_trace.record_takes(p, batches) if trace else None
    if not trace:
        batches = _count_batches(p)
    pad = "x" * size
    send = p.send
    key_names = [f"k{k}" for k in range(keys)] if keys else None
    busy = pacing == "busy"
    results.put({"ready": idx})
    if not go.wait(60):
        raise TimeoutError("no go signal within 60 s")
    i = 0
    t_first = time.time()
    start = time.monotonic()
    end = start + seconds
    try:
        while i < count:
            now = time.monotonic()
            if now >= end:
                break
            stop = _pace(i, count, start, now, rate)
            if i >= stop:
                if not busy:
                    time.sleep(0.0002)
                continue
            while i < stop:
                n = idx + i * producers
                send(EVENT_TYPE, {"n": n, "pad": pad}, key=key_names[n % keys] if key_names else None)
                i += 1
    finally:
        result["sent"] = i
    result.update(t_first=t_first, t_last=time.time())
    p.flush(120)
    result["t_flushed"] = time.time()
    p.close(60)  # a router far behind on a loaded host takes a while; a timeout is reported as an error
    result.update(
        cpu=time.process_time(),
        resent=getattr(p, "stats", {}).get("resent"),
        batches=batches[0],
        avg_batch=round(i / batches[0], 1) if batches[0] else 0,
    )
    if takes is not None:
        result.update(bench_trace.takes_to_result(takes))


async def _produce_async(
    idx, producers, endpoint, confirm, count, seconds, rate, size, keys, window, go, results, pacing, result, trace
) -> None:
    import asyncio

    from nexus import AsyncProducer

    p = AsyncProducer(endpoint, source=f"bench-{idx}", confirm=confirm, window=window)
    batches = [0]
    takes = bench_trace.record_takes(p, batches) if trace else None
    if not trace:
        batches = _count_batches(p)
    pad = "x" * size
    send = p.send
    key_names = [f"k{k}" for k in range(keys)] if keys else None
    busy = pacing == "busy"
    results.put({"ready": idx})
    if not await asyncio.to_thread(go.wait, 60):
        raise TimeoutError("no go signal within 60 s")
    i = 0
    t_first = time.time()
    start = time.monotonic()
    end = start + seconds
    try:
        while i < count:
            now = time.monotonic()
            if now >= end:
                break
            stop = _pace(i, count, start, now, rate)
            if i >= stop:
                if not busy:
                    await asyncio.sleep(0.0002)
                continue
            while i < stop:
                n = idx + i * producers
                await send(EVENT_TYPE, {"n": n, "pad": pad}, key=key_names[n % keys] if key_names else None)
                i += 1
            if not rate:
                await asyncio.sleep(0)  # unpaced: let the producer's tasks run between bursts
    finally:
        result["sent"] = i
    result.update(t_first=t_first, t_last=time.time())
    await p.flush(120)
    result["t_flushed"] = time.time()
    await p.close(60)
    result.update(
        cpu=time.process_time(),
        resent=getattr(p, "stats", {}).get("resent"),
        batches=batches[0],
        avg_batch=round(i / batches[0], 1) if batches[0] else 0,
    )
    if takes is not None:
        result.update(bench_trace.takes_to_result(takes))


def _count_batches(producer) -> list[int]:
    """Count the messages the producer's I/O thread sends (wraps Outbox.next_batch)."""
    counter = [0]
    outbox = getattr(producer, "_outbox", None)
    if outbox is None:
        return counter
    original = outbox.next_batch

    def next_batch(now):
        batch = original(now)
        if batch is not None:
            counter[0] += 1
        return batch

    outbox.next_batch = next_batch
    return counter


# -- member results ------------------------------------------------------------------------
def read_progress(out: Path) -> dict[str, int]:
    totals: dict[str, int] = {}
    for f in out.glob("progress-*.json"):
        try:
            data = msgspec.json.decode(f.read_bytes())
        except (OSError, msgspec.DecodeError):
            continue
        group = f.name[len("progress-") :].rsplit("-", 1)[0]
        totals[group] = totals.get(group, 0) + data["count"]
    return totals


def read_results(out: Path) -> list[dict]:
    return [msgspec.msgpack.decode(f.read_bytes()) for f in sorted(out.glob("result-*.msgpack"))]


def percentiles(values: list[float], qs=(50, 90, 99, 99.9)) -> dict[str, float]:
    if not values:
        return {}
    values = sorted(values)
    out = {}
    for q in qs:
        k = min(len(values) - 1, max(0, math.ceil(q / 100 * len(values)) - 1))
        out[f"p{q:g}".replace(".", "")] = round(values[k] * 1000, 3)
    out["max"] = round(values[-1] * 1000, 3)
    out["mean"] = round(sum(values) / len(values) * 1000, 3)
    out["samples"] = len(values)
    return out


# -- the Nexus run ---------------------------------------------------------------------------
def child_env() -> dict[str, str]:
    """The pipeline's environment additions: this checkout first on PYTHONPATH."""
    return {"PYTHONPATH": os.pathsep.join(p for p in (REPO, os.environ.get("PYTHONPATH")) if p)}


def stop_run(prods: list, pipeline: LaunchedPipeline, tmp: Path, keep: bool) -> None:
    """A run's end, whatever happened: the producer processes (killed if they hang), the
    pipeline, then its folder removed (or kept and named, `--keep`)."""
    for p in prods:
        p.join(2)
        if p.is_alive():
            p.kill()
            p.join(5)
    try:
        pipeline.stop(60)
    finally:
        if keep:
            print(f"kept {tmp}", file=sys.stderr)
        else:
            shutil.rmtree(tmp, ignore_errors=True)


def run_nexus(args) -> dict:
    tmp = Path(tempfile.mkdtemp(prefix="nexus-bench-"))
    out = tmp / "out"
    config_path = write_config(tmp, args)
    env = child_env()
    pipeline = LaunchedPipeline(str(config_path), env=env)
    mp = multiprocessing.get_context("spawn")
    prods: list = []
    profilers: list[subprocess.Popen] = []
    scraper: Scraper | None = None
    tap: bench_trace.Tap | None = None
    summary: dict = {"config": str(config_path) if args.keep else None}
    try:
        t_spawn = time.monotonic()
        pipeline.start(wait_ready=True, timeout=60)
        summary["ready_s"] = round(time.monotonic() - t_spawn, 3)
        for g in range(args.groups):
            pipeline.wait_members(f"bench{g}", args.members, timeout=60)
        summary["assigned_s"] = round(time.monotonic() - t_spawn, 3)
        procs = pipeline.processes()
        pids = {p["name"]: p["pid"] for p in procs if p["pid"]}
        pids["launcher"] = pipeline.proc.pid
        pids.update(getattr(args, "extra_pids", {}))  # the nats-server nodes (bench/engines.py)
        cfg_endpoint = pipeline.cfg.confirm if args.mode == "confirm" else pipeline.cfg.ingest
        curve = pipeline.cfg.security.curve
        if curve.secret_key_file:  # the producers (spawned: they read it at start) use the router's key pair
            os.environ["NEXUS_CURVE_SECRET_KEY_FILE"] = curve.secret_key_file
            os.environ["NEXUS_CURVE_SERVER_KEY"] = curve.secret_key_file

        per_producer = args.count or (
            math.ceil(args.rate * args.duration / args.producers) + 1 if args.rate else DEFAULT_MAX_PER_PRODUCER
        )
        results, go = mp.Queue(), mp.Event()
        rate = args.rate / args.producers if args.rate else 0.0
        prods = [
            mp.Process(
                target=producer_main,
                daemon=True,
                args=(
                    i,
                    args.producers,
                    cfg_endpoint,
                    args.mode == "confirm",
                    per_producer,
                    args.duration,
                    rate,
                    args.size,
                    args.keys,
                    args.window,
                    go,
                    results,
                    args.pacing,
                    args.async_producer,
                    args.trace,
                ),
            )
            for i in range(args.producers)
        ]
        for p in prods:
            p.start()
        # producers import nexus and create their Producer first; `go` starts the clock
        ready = 0
        ready_deadline = time.monotonic() + 60
        while ready < len(prods):
            try:
                msg = results.get(timeout=max(0.1, ready_deadline - time.monotonic()))
            except queue.Empty:
                raise RuntimeError(f"only {ready} of {len(prods)} producers started within 60 s") from None
            if "ready" in msg:
                ready += 1
            else:
                raise RuntimeError(msg.get("error") or f"unexpected producer message {msg}")
        sampler = Sampler(pids, args.sample_interval).start()
        if args.scrape_metrics == "on":
            scraper = Scraper(pipeline.cfg.http.listen).start()
        if args.profile:
            profilers = start_profilers(args, {**pids, "producer0": prods[0].pid}, tmp)
        if args.trace:
            tap = bench_trace.Tap(pipeline.cfg.publish).start()
        t_go = time.time()
        go.set()

        # producers: bounded by duration (+ flush)
        prod_results: list[dict] = []
        deadline = time.monotonic() + args.duration + 180
        while len(prod_results) < len(prods) and time.monotonic() < deadline:
            try:
                prod_results.append(results.get(timeout=0.5))
            except queue.Empty:
                if not any(p.is_alive() for p in prods):
                    try:
                        prod_results.append(results.get(timeout=1))
                    except queue.Empty:
                        break
        errors = [r["error"] for r in prod_results if r.get("error")]
        sent = [0] * args.producers
        for r in prod_results:
            sent[r["idx"]] = r["sent"]
        total_sent = sum(sent)

        # handlers: wait until every group counted every event (or stalled / timed out)
        last_total, last_change = -1, time.monotonic()
        drain_deadline = time.monotonic() + args.drain_timeout
        while time.monotonic() < drain_deadline:
            progress = read_progress(out)
            counts = [progress.get(f"bench{g}", 0) for g in range(args.groups)]
            if all(c >= total_sent for c in counts):
                break
            if sum(counts) != last_total:
                last_total, last_change = sum(counts), time.monotonic()
            elif time.monotonic() - last_change > args.stall_timeout:
                errors.append(f"handlers stalled at {counts} of {total_sent}")
                break
            time.sleep(0.05)
        else:
            errors.append(f"drain timeout: handled {read_progress(out)} of {total_sent}")
        t_done = time.time()
        drained = not any(e.startswith(("drain timeout", "handlers stalled")) for e in errors)
        sampler.stop()
        if scraper is not None:
            summary["scrape"] = scraper.stop()
            scraper = None
        for prof in profilers:
            try:
                prof.wait(max(5.0, args.profile_seconds + 10))
            except subprocess.TimeoutExpired:
                prof.terminate()
        status = pipeline.router_status(5.0) or {}
        restarts = {p["name"]: p["restarts"] for p in pipeline.processes()}
        t_stop = time.monotonic()
        code = pipeline.stop(60)
        summary["stop_s"] = round(time.monotonic() - t_stop, 3)
        summary["launcher_exit"] = code
        member_results = read_results(out)
        summary.update(analyze(args, sent, prod_results, member_results, sampler, t_go, t_done, status, restarts, pids))
        if tap is not None:
            t_first = min((r["t_first"] for r in prod_results if r.get("t_first")), default=t_go)
            summary["trace"] = bench_trace.analyze(
                prod_results, member_results, tap.stop(), args.producers, t_first + args.warmup
            )
            tap = None
        summary["errors"] = errors + summary.get("errors", [])
        # without a full drain, "lost" counts events not handled by the end of the run:
        # they are in the journal, not gone
        summary["drained"] = drained
        if args.profile:
            summary["profiles"] = sorted(str(p) for p in Path(args.profile).glob("*"))
        return summary
    finally:
        if scraper is not None:
            scraper.stop()
        if tap is not None:
            tap.stop()
        for prof in profilers:
            if prof.poll() is None:
                prof.terminate()
                prof.wait(10)
        stop_run(prods, pipeline, tmp, args.keep)


def start_profilers(args, pids: dict[str, int], tmp: Path) -> list[subprocess.Popen]:
    """py-spy record on the router, the first member and the first producer."""
    os.makedirs(args.profile, exist_ok=True)
    procs = []
    targets = ["router"] + [n for n in pids if n.startswith("bench")][:1] + ["producer0"]
    for name in targets:
        base = os.path.join(args.profile, f"{name}")
        cmd = [
            "py-spy",
            "record",
            "--pid",
            str(pids[name]),
            "--duration",
            str(int(max(1, args.profile_seconds or args.duration))),
            "--rate",
            "200",
            "--format",
            args.profile_format,
            *(["--native"] if args.profile_native else []),
            "-o",
            base + (".svg" if args.profile_format == "flamegraph" else f".{args.profile_format}"),
        ]
        procs.append(subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
    return procs


def analyze(args, sent, prod_results, member_results, sampler, t_go, t_done, status, restarts, pids) -> dict:
    errors = []
    total_sent = sum(sent)
    t_first = min((r["t_first"] for r in prod_results if r.get("t_first")), default=t_go)
    t_last_send = max((r["t_last"] for r in prod_results if r.get("t_last")), default=t_go)
    groups = {}
    all_latency: list[float] = []
    windows: dict[int, list[float]] = {}  # second of sending -> latency samples
    last_handler = 0.0
    warm = t_first + args.warmup
    for g in range(args.groups):
        name = f"bench{g}"
        rs = [r for r in member_results if r["group"] == name]
        if len(rs) < args.members:
            errors.append(f"{name}: {len(rs)} member results for {args.members} members")
        loss = baselines.count_loss([r["bitmap"] for r in rs], sent)
        handled = sum(r["count"] for r in rs)
        last = max((r["last"] for r in rs), default=0.0)
        last_handler = max(last_handler, last)
        lat: list[float] = []
        for r in rs:
            a, t = array.array("d"), array.array("d")
            a.frombytes(r["latency"])
            t.frombytes(r["sent_at"])
            for x, sent_at in zip(a, t, strict=False):
                if sent_at >= warm:
                    lat.append(x)
                    windows.setdefault(int(sent_at - warm), []).append(x)
        groups[name] = {
            "handled": handled,
            "unique": loss["unique"],
            "lost": loss["lost"],
            "duplicates": sum(r["duplicates"] for r in rs) + loss["cross_duplicates"],
            "unexpected": loss["unexpected"],
            "members": len(rs),
            "per_member": [r["count"] for r in rs],
        }
        all_latency.extend(lat)
    elapsed = last_handler - t_first if last_handler else 0.0
    unique = min((g["unique"] for g in groups.values()), default=0)
    send_window = t_last_send - t_first
    samples = {}
    for name, series in sampler.series.items():
        if len(series) >= 2:
            first, last = series[0], series[-1]
            wall = last["t"] - first["t"]
            samples[name] = {
                "cpu_s": round(last["cpu"] - first["cpu"], 3),
                "cpu_pct": round(100 * (last["cpu"] - first["cpu"]) / wall, 1) if wall > 0 else 0.0,
                "rss_mb": round(last["rss"] / 2**20, 1),
                "peak_rss_mb": round(max(s["hwm"] for s in series) / 2**20, 1),
                "rss_1min_mb": (
                    round(sampler.rss_at(name, 60) / 2**20, 1) if sampler.rss_at(name, 60) is not None else None
                ),
                "rss_series_mb": [
                    [round(x["t"] - first["t"], 1), round(x["rss"] / 2**20, 1)]
                    for x in series[:: max(1, len(series) // 60)]
                ],
            }
    router_status = status.get("router", {})
    # per-second windows: other tenants of a shared machine show up as bad seconds;
    # the median window is robust to a few of them
    per_window = [percentiles(v) for _, v in sorted(windows.items()) if len(v) >= 100]
    window_summary = {}
    if per_window:
        for q in ("p50", "p99"):
            vals = sorted(w[q] for w in per_window)
            window_summary[q] = {"best": vals[0], "median": vals[len(vals) // 2], "worst": vals[-1]}
        window_summary["windows"] = len(per_window)
    ours = sum(s["cpu_s"] for s in samples.values()) + sum(r.get("cpu") or 0 for r in prod_results)
    wall = sampler.series["router"][-1]["t"] - sampler.series["router"][0]["t"] if sampler.series.get("router") else 0
    host = sampler.host_busy_cores()
    return {
        "host_busy_cores": host,
        "other_load_cores": round(max(0.0, host - ours / wall), 2) if wall > 0 else None,
        "latency_windows_ms": window_summary,
        "errors": errors,
        "sent": total_sent,
        "send_window_s": round(send_window, 3),
        "send_rate": round(total_sent / send_window) if send_window > 0 else 0,
        "elapsed_s": round(elapsed, 3),
        "events_per_s": round(unique / elapsed) if elapsed > 0 else 0,
        "deliveries_per_s": round(sum(g["unique"] for g in groups.values()) / elapsed) if elapsed > 0 else 0,
        "lost": sum(g["lost"] for g in groups.values()),
        "duplicates": sum(g["duplicates"] for g in groups.values()),
        "groups": groups,
        "latency_ms": percentiles(all_latency),
        "processes": samples,
        "producers": [
            {k: r.get(k) for k in ("idx", "sent", "cpu", "resent", "batches", "avg_batch", "error")}
            for r in prod_results
        ],
        "router": {k: router_status.get(k) for k in ("accepted", "rejected", "duplicates", "seq")},
        "restarts": {k: v for k, v in restarts.items() if v},
    }


# -- output --------------------------------------------------------------------------------------
def print_table(args, summary: dict) -> None:
    nx = summary["nexus"]
    p = print
    p(
        f"\nNexus pipeline: mode={args.mode} fsync={args.fsync} producers={args.producers} groups={args.groups} "
        f"members={args.members} size={args.size}B keys={args.keys or 'source'} "
        f"rate={'max' if not args.rate else f'{args.rate:g}/s ({args.pacing} pacing)'} "
        f"producer={'async' if args.async_producer else 'sync'} duration={args.duration:g}s batch={MAX_BATCH_EVENTS}"
    )
    p(
        f"  ready          {nx.get('ready_s')} s  (spawn -> LaunchedPipeline.wait_ready; partitions assigned at "
        f"{nx.get('assigned_s')} s)"
    )
    p(f"  sent           {nx['sent']:,} events in {nx['send_window_s']} s ({nx['send_rate']:,}/s at the producers)")
    p(
        f"  end to end     {nx['events_per_s']:,} events/s  ({nx['elapsed_s']} s first send -> last handler; "
        f"{nx['deliveries_per_s']:,} deliveries/s over {args.groups} group(s))"
    )
    lat = nx["latency_ms"]
    if lat:
        p(
            f"  latency ms     p50 {lat['p50']}  p90 {lat['p90']}  p99 {lat['p99']}  p99.9 {lat['p999']}  "
            f"max {lat['max']}  ({lat['samples']:,} samples, send -> handler start)"
        )
    lw = nx.get("latency_windows_ms")
    if lw:
        p(
            "  per 1 s window p50 best/median/worst "
            f"{lw['p50']['best']}/{lw['p50']['median']}/{lw['p50']['worst']} ms, "
            f"p99 {lw['p99']['best']}/{lw['p99']['median']}/{lw['p99']['worst']} ms ({lw['windows']} windows)"
        )
    p(
        f"  host           {nx.get('host_busy_cores')} of {os.cpu_count()} CPUs busy on average; other tenants "
        f"~{nx.get('other_load_cores')} CPUs (busy minus this run's processes)"
    )
    lost_label = "lost / dup    " if nx.get("drained", True) else "unhandled/dup "
    p(
        f"  {lost_label} {nx['lost']} / {nx['duplicates']}    router accepted={nx['router'].get('accepted')} "
        f"rejected={nx['router'].get('rejected')}"
    )
    p(f"  {'process':<12}{'cpu s':>9}{'cpu %':>8}{'rss MB':>9}{'peak MB':>9}{'@1min MB':>10}")
    for name, s in nx["processes"].items():
        p(
            f"  {name:<12}{s['cpu_s']:>9}{s['cpu_pct']:>8}{s['rss_mb']:>9}{s['peak_rss_mb']:>9}"
            f"{s['rss_1min_mb'] if s['rss_1min_mb'] is not None else '-':>10}"
        )
    for pr in nx["producers"]:
        p(
            f"  producer {pr['idx']}: sent {pr['sent']:,} in {pr.get('batches')} messages (avg {pr.get('avg_batch')} "
            f"events) cpu {pr.get('cpu') and round(pr['cpu'], 2)} s resent {pr.get('resent')} {pr.get('error') or ''}"
        )
    if "trace" in nx:
        bench_trace.print_trace(nx["trace"])
    if nx.get("restarts"):
        p(f"  restarts       {nx['restarts']}")
    sc = nx.get("scrape")
    if sc:
        p(
            f"  metrics        {sc['scrapes']} scrapes (1/s): mean {sc['mean_ms']} ms, max {sc['max_ms']} ms, "
            f"{sc['bytes']:,} bytes {'; errors: ' + '; '.join(sc['errors']) if sc['errors'] else ''}"
        )
    for e in nx.get("errors", []):
        p(f"  ERROR          {e}")
    if summary.get("nexus_runs"):
        r = summary["nexus_runs"]
        p(
            f"  over {len(r['events_per_s']['all'])} runs: events/s best {r['events_per_s']['best']:,} median "
            f"{r['events_per_s']['median']:,} (all {r['events_per_s']['all']}); "
            f"p50 ms best {r['latency_p50_ms']['best']} "
            f"median {r['latency_p50_ms']['median']}; p99 ms best {r['latency_p99_ms']['best']} median "
            f"{r['latency_p99_ms']['median']}; p99.9 ms best {r['latency_p999_ms']['best']} median "
            f"{r['latency_p999_ms']['median']}; lost {r['lost']} dup {r['duplicates']}"
        )
    if summary.get("ready"):
        rd = summary["ready"]
        p(
            f"  ready x{rd['ready_s']['n']}       best {rd['ready_s']['best']} s  median {rd['ready_s']['median']} s  "
            f"worst {rd['ready_s']['worst']} s  (all members assigned: median {rd['assigned_s']['median']} s)"
        )
    for key in ("raw_zmq", "mpqueue"):
        b = summary.get(key)
        if b:
            runs = f"  (runs: best {b['runs']['best']:,} median {b['runs']['median']:,})" if b.get("runs") else ""
            p(
                f"\nbaseline {key:<8} {b['events_per_s']:>10,} events/s  sent {b['sent']:,} lost {b['lost']} "
                f"dup {b['duplicates']}  cpu s {b['cpu_s']} {b.get('error') or ''}{runs}"
            )
    if summary.get("ratios"):
        p("\nratios  " + "  ".join(f"{k} = {v}" for k, v in summary["ratios"].items()))
        if args.rate or args.groups > 1 or args.members > 1:
            p(
                "        (the baselines run unpaced with one consumer: compare against an unpaced "
                "1-group, 1-member Nexus run)"
            )


def parse_args(argv=None):
    ap = argparse.ArgumentParser(prog="python -m bench.pipeline", description=__doc__.split("\n\n")[0])
    ap.add_argument("--duration", type=float, default=10.0, help="seconds of sending (default 10)")
    ap.add_argument(
        "--count",
        type=int,
        default=0,
        help=f"max events per producer (default: rate*duration, or {DEFAULT_MAX_PER_PRODUCER:,} unpaced)",
    )
    ap.add_argument("--rate", type=float, default=0.0, help="total events/s, paced (default 0: as fast as possible)")
    ap.add_argument(
        "--pacing",
        choices=("sleep", "busy"),
        default="sleep",
        help="with --rate: the producer naps 0.2 ms while ahead (sleep, default) or spins on the clock "
        "(busy: a caller thread that computes between sends and never sleeps)",
    )
    ap.add_argument("--async-producer", action="store_true", help="producers use AsyncProducer (asyncio)")
    ap.add_argument("--producers", type=int, default=1)
    ap.add_argument("--groups", type=int, default=1)
    ap.add_argument("--members", type=int, default=1, help="processes per group")
    ap.add_argument("--partitions", type=int, default=16)
    ap.add_argument("--size", type=int, default=16, help="bytes of padding in the payload")
    ap.add_argument("--keys", type=int, default=0, help="distinct partition keys (default 0: key = source)")
    ap.add_argument("--mode", choices=("fire", "confirm"), default="fire")
    ap.add_argument("--window", type=int, default=20_000, help="confirm-mode window of unacked events")
    ap.add_argument("--fsync", choices=("interval", "always", "never"), default="interval")
    ap.add_argument("--fsync-interval-ms", type=int, default=50)
    ap.add_argument("--retain", default="7d", help="journal retention (e.g. 30s for long runs)")
    ap.add_argument("--max-in-flight", type=int, default=0, help="per member (default: config default)")
    ap.add_argument(
        "--sample-every",
        type=int,
        default=0,
        help="latency sample 1 in N events (default: every event when paced, up to 900k samples; else 50)",
    )
    ap.add_argument(
        "--warmup", type=float, default=0.5, help="latency: ignore events sent in the first S seconds (default 0.5)"
    )
    ap.add_argument("--sample-interval", type=float, default=0.5, help="CPU/RSS sampling period (s)")
    ap.add_argument("--drain-timeout", type=float, default=120.0)
    ap.add_argument("--stall-timeout", type=float, default=20.0)
    ap.add_argument("--log-level", default="info", choices=("debug", "info", "warning", "error"))
    ap.add_argument(
        "--baselines",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="also run the raw pyzmq and multiprocessing.Queue baselines (default on)",
    )
    ap.add_argument("--baseline-timeout", type=float, default=120.0)
    ap.add_argument("--profile", metavar="DIR", help="py-spy record the router and one member into DIR")
    ap.add_argument("--profile-seconds", type=float, default=0, help="py-spy duration (default: --duration)")
    ap.add_argument("--profile-native", action="store_true", help="py-spy --native (C frames too)")
    ap.add_argument("--profile-format", default="raw", choices=("raw", "flamegraph", "speedscope"))
    ap.add_argument("--keep", action="store_true", help="keep the temp dir (config, journal, logs)")
    ap.add_argument(
        "--scrape-metrics",
        nargs="?",
        const="on",
        default="",
        choices=("on", "both"),
        help="run with the HTTP port and GET its /metrics every second, as Prometheus would; "
        "=both: runs without and with scraping, alternating (--repeat rounds), then both figures",
    )
    ap.add_argument(
        "--repeat",
        type=int,
        default=1,
        help="run Nexus (and each baseline) N times; report the median run, best and median",
    )
    ap.add_argument(
        "--ready-repeat",
        type=int,
        default=0,
        metavar="N",
        help="first measure spawn -> ready N times (start/stop only)",
    )
    ap.add_argument(
        "--trace",
        action="store_true",
        help="per-hop times of every sampled event (producer, router, member; bench/trace.py) "
        "and what the slowest 1%% waited on",
    )
    ap.add_argument("--json", action="store_true", help="print a JSON summary instead of the table")
    ap.add_argument(
        "--engine",
        choices=("embedded", "nats"),
        default="embedded",
        help="nats: the embedded engine, then Nexus on a 1-node and a 3-node (replicas 3) NATS cluster it starts "
        "itself: fire and confirm events/s, latency at --rate (default 10,000/s), a stream leader kill (3 nodes)",
    )
    ap.add_argument(
        "--curve",
        action="store_true",
        help="run over loopback TCP twice, without and with CURVE (security.curve), and compare",
    )
    args = ap.parse_args(argv)
    if not args.sample_every:
        # every event when paced, but at most ~900,000 samples per run (the handler keeps 1M)
        args.sample_every = max(1, math.ceil(args.rate * args.duration / 900_000)) if args.rate else 50
    for name in ("producers", "groups", "members"):
        if getattr(args, name) < 1:
            ap.error(f"--{name} must be >= 1")
    return args


def measure_ready(args) -> dict:
    """Spawn -> LaunchedPipeline.wait_ready, `--ready-repeat` times (start and stop only)."""
    times, assigned = [], []
    for _ in range(args.ready_repeat):
        tmp = Path(tempfile.mkdtemp(prefix="nexus-bench-ready-"))
        env = child_env()
        pipeline = LaunchedPipeline(str(write_config(tmp, args)), env=env)
        try:
            t0 = time.monotonic()
            pipeline.start(wait_ready=True, timeout=60)
            times.append(time.monotonic() - t0)
            for g in range(args.groups):
                pipeline.wait_members(f"bench{g}", args.members, timeout=60)
            assigned.append(time.monotonic() - t0)
        finally:
            pipeline.stop(60)
            shutil.rmtree(tmp, ignore_errors=True)
    return {"ready_s": spread(times), "assigned_s": spread(assigned)}


def spread(values: list[float]) -> dict:
    """best (lowest), median and worst of repeated measurements of a time."""
    if not values:
        return {}
    v = sorted(values)
    return {"best": round(v[0], 3), "median": round(v[len(v) // 2], 3), "worst": round(v[-1], 3), "n": len(v)}


def best_median(runs: list[dict], key: str, higher_is_better: bool = True) -> dict:
    values = sorted(r[key] for r in runs)
    if not values:
        return {}
    return {
        "best": values[-1] if higher_is_better else values[0],
        "median": values[len(values) // 2],
        "all": [r[key] for r in runs],
    }


def main(argv=None) -> int:
    args = parse_args(argv)
    try:
        return _main(args)
    except (RuntimeError, TimeoutError) as exc:
        print(f"bench: {exc}", file=sys.stderr)
        return 1


def _main(args) -> int:
    if args.engine == "nats":
        from . import engines

        return engines.compare(args)
    if args.scrape_metrics == "both":
        return _scrape_both(args)
    if not args.curve:
        return _one(args)
    # the same run: tcp without CURVE, then with it; then both figures side by side
    figures, code = {}, 0
    for variant in ("tcp", "tcp+curve"):
        args.variant = variant
        print(f"== {variant} ==", flush=True)
        code |= _one(args, figures.setdefault(variant, {}))
    off, on = figures["tcp"], figures["tcp+curve"]
    print(
        f"CURVE on/off: events/s {on['events_per_s']:,.0f} / {off['events_per_s']:,.0f} "
        f"({on['events_per_s'] / max(off['events_per_s'], 1):.2f}x); latency p99 ms {on['p99']} / {off['p99']}"
    )
    return code


def _scrape_both(args) -> int:
    """Runs without and with a metrics scrape every second, alternating (so a change in the
    host's load lands on both), then the medians side by side."""
    rounds, args.repeat = args.repeat, 1
    figures: dict[str, list[dict]] = {"off": [], "on": []}
    code = 0
    for i in range(rounds):
        for variant in ("off", "on"):
            args.scrape_metrics = "on" if variant == "on" else ""
            print(f"== round {i + 1}: scraping {variant} ==", flush=True)
            figures[variant].append(got := {})
            code |= _one(args, got)
    med = {v: sorted(f["events_per_s"] for f in runs)[len(runs) // 2] for v, runs in figures.items()}
    print(
        f"metrics scraped 1/s vs not: events/s median {med['on']:,.0f} / {med['off']:,.0f} "
        f"({med['on'] / max(med['off'], 1):.3f}x); all on {[f['events_per_s'] for f in figures['on']]} "
        f"off {[f['events_per_s'] for f in figures['off']]}; p99 ms on {[f['p99'] for f in figures['on']]} "
        f"off {[f['p99'] for f in figures['off']]}"
    )
    return code


def _one(args, figures: dict | None = None) -> int:
    summary: dict = {"args": vars(args)}
    if args.ready_repeat:
        summary["ready"] = measure_ready(args)
    try:
        runs = [run_nexus(args) for _ in range(args.repeat)]
    finally:
        os.environ.pop("NEXUS_CURVE_SECRET_KEY_FILE", None)
        os.environ.pop("NEXUS_CURVE_SERVER_KEY", None)
    # the run with the median events/s represents the set; best and median of each figure too
    order = sorted(range(len(runs)), key=lambda i: runs[i]["events_per_s"])
    nx = summary["nexus"] = runs[order[len(order) // 2]]
    if len(runs) > 1:
        summary["nexus_runs"] = {
            "events_per_s": best_median(runs, "events_per_s"),
            "latency_p50_ms": best_median([{"v": r["latency_ms"].get("p50", 0)} for r in runs], "v", False),
            "latency_p99_ms": best_median([{"v": r["latency_ms"].get("p99", 0)} for r in runs], "v", False),
            "latency_p999_ms": best_median([{"v": r["latency_ms"].get("p999", 0)} for r in runs], "v", False),
            "ready_s": best_median(runs, "ready_s", False),
            "lost": sum(r["lost"] for r in runs),
            "duplicates": sum(r["duplicates"] for r in runs),
        }
    if args.baselines and nx["sent"]:
        count = math.ceil(nx["sent"] / args.producers)
        seconds = max(args.duration * 3, 30.0)
        for key, fn in (("raw_zmq", baselines.run_raw_zmq), ("mpqueue", baselines.run_mpqueue)):
            bruns = [fn(count, args.producers, args.size, seconds, args.baseline_timeout) for _ in range(args.repeat)]
            border = sorted(range(len(bruns)), key=lambda i: bruns[i]["events_per_s"])
            summary[key] = bruns[border[len(border) // 2]]
            if len(bruns) > 1:
                summary[key]["runs"] = best_median(bruns, "events_per_s")
        ratios = {}
        for key in ("raw_zmq", "mpqueue"):
            if summary[key]["events_per_s"]:
                ratios[f"nexus/{key}"] = round(nx["events_per_s"] / summary[key]["events_per_s"], 2)
        summary["ratios"] = ratios
    if figures is not None:
        figures.update(events_per_s=nx["events_per_s"], p99=nx["latency_ms"].get("p99"))
    if args.json:
        print(json.dumps(summary, indent=2, default=str))
    else:
        print_table(args, summary)
    failed = any(r.get("errors") or r.get("lost") or r.get("duplicates") for r in runs)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
