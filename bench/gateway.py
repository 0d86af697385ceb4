"""Gateway benchmark: events/s through the HTTP gateway into a launched pipeline, and the
latency from the gateway taking an event to its handler's start.

    python -m bench.gateway                          # every mode, 20,000 events each
    python -m bench.gateway --mode single --events 5000 --clients 16
    python -m bench.gateway --json

Modes (each on a fresh pipeline: one no-op member, bench.noop:Counter):
- single: `POST /v1/events` with one event per request, `--clients` concurrent clients
  (aiohttp, keep-alive);
- batch:  `POST /v1/events` with `--batch` events per request;
- stream: one WebSocket `/v1/stream`, one event per message, acks read as they come
  (the gateway's back-pressure bounds what is in flight).

events/s = events / (first send -> last answer `accepted`): an answer means journaled.
Latency: events carry no `time`, so the gateway stamps it when it parses the request;
the handler records its start minus that time (p50/p99 over every event).
Every run is bounded; the pipeline is stopped and its temp dir removed.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import tempfile
import time
from array import array
from pathlib import Path

import aiohttp
import yaml

from nexus.gateway.tokens import TokenEntry, hash_token, write
from nexus.testing import LaunchedPipeline, free_port, wait_for

from .pipeline import percentiles, read_progress, read_results

TOKEN = "nxg_bench-token-0123456789abcdefghijklmnop"


def write_config(tmp: Path, port: int) -> Path:
    out = tmp / "out"
    out.mkdir(parents=True)
    tokens = tmp / "tokens.yaml"
    write(str(tokens), {"bench": TokenEntry(hash=hash_token(TOKEN), sources=["*"], types=["*"])})
    cfg = {
        "data_dir": "./var",
        "log": {"level": "warning", "format": "console"},
        "router": {"ingest": "ipc://{data_dir}/run/ingest", "confirm": "ipc://{data_dir}/run/confirm"},
        "contracts_untyped": ["bench.*"],
        "http": {"listen": ""},
        "gateway": {"listen": f"127.0.0.1:{port}", "tokens_file": str(tokens)},
        "workers": {
            "bench": {
                "handler": "bench.noop:Counter",
                "subscribe": ["bench.*"],
                "start": "earliest",
                "options": {"out": str(out), "group": "bench"},
            }
        },
    }
    path = tmp / "nexus.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def ev(n: int) -> dict:
    return {"type": "bench.event", "source": "bench", "payload": {"n": n}}


async def run_single(base: str, n: int, clients: int) -> float:
    per = n // clients

    async def client(k: int, s: aiohttp.ClientSession) -> None:
        for i in range(k * per, (k + 1) * per):
            async with s.post(f"{base}/v1/events", json=ev(i)) as r:
                assert r.status == 200, await r.text()
                await r.read()

    async with aiohttp.ClientSession(headers={"Authorization": f"Bearer {TOKEN}"}) as s:
        t0 = time.perf_counter()
        await asyncio.gather(*(client(k, s) for k in range(clients)))
        return time.perf_counter() - t0


async def run_batch(base: str, n: int, clients: int, batch: int) -> float:
    starts = list(range(0, n, batch))

    async def client(k: int, s: aiohttp.ClientSession) -> None:
        for i in starts[k::clients]:
            async with s.post(f"{base}/v1/events", json=[ev(j) for j in range(i, min(i + batch, n))]) as r:
                assert r.status == 200, await r.text()
                await r.read()

    async with aiohttp.ClientSession(headers={"Authorization": f"Bearer {TOKEN}"}) as s:
        t0 = time.perf_counter()
        await asyncio.gather(*(client(k, s) for k in range(clients)))
        return time.perf_counter() - t0


async def run_stream(base: str, n: int) -> float:
    async with aiohttp.ClientSession() as s:
        url = base.replace("http://", "ws://") + "/v1/stream"
        async with s.ws_connect(url, headers={"Authorization": f"Bearer {TOKEN}"}) as ws:

            async def read() -> None:
                for _ in range(n):
                    ack = json.loads((await ws.receive(timeout=120)).data)
                    assert ack["status"] == "accepted", ack

            t0 = time.perf_counter()
            reader = asyncio.ensure_future(read())
            for i in range(n):
                await ws.send_str(json.dumps(ev(i)))
            await reader
            return time.perf_counter() - t0


def one(mode: str, args) -> dict:
    tmp = Path(tempfile.mkdtemp(prefix="nexus-bench-gw-"))
    try:
        port = free_port()
        base = f"http://127.0.0.1:{port}"
        with LaunchedPipeline(str(write_config(tmp, port))) as p:
            wait_for(lambda: _up(base), 60, 0.05, "gateway up")
            if mode == "single":
                elapsed = asyncio.run(run_single(base, args.events, args.clients))
            elif mode == "batch":
                elapsed = asyncio.run(run_batch(base, args.events, args.clients, args.batch))
            else:
                elapsed = asyncio.run(run_stream(base, args.events))
            out = tmp / "out"
            wait_for(lambda: read_progress(out).get("bench", 0) >= args.events, 120, 0.1, "all handled")
            p.stop()
        results = read_results(tmp / "out")
        latency: list[float] = []
        for r in results:
            samples = array("d")
            samples.frombytes(r["latency"])
            latency += samples.tolist()
        return {
            "mode": mode,
            "events": args.events,
            "events_per_s": round(args.events / elapsed),
            "latency_ms": percentiles(latency, (50, 99)),
            "load": os.getloadavg()[0],
        }
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _up(base: str) -> bool:
    import urllib.request

    try:
        with urllib.request.urlopen(f"{base}/healthz", timeout=2) as r:
            return r.status == 200
    except OSError:
        return False


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.gateway")
    ap.add_argument("--mode", choices=["single", "batch", "stream", "all"], default="all")
    ap.add_argument("--events", type=int, default=20_000)
    ap.add_argument("--clients", type=int, default=8)
    ap.add_argument("--batch", type=int, default=100)
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args(argv)
    modes = ["single", "batch", "stream"] if args.mode == "all" else [args.mode]
    rows = [one(m, args) for m in modes]
    if args.json:
        print(json.dumps(rows))
    else:
        for r in rows:
            lat = r["latency_ms"]
            print(
                f"{r['mode']:7} {r['events']:>8} events  {r['events_per_s']:>8} events/s  "
                f"accept->handler p50 {lat.get('p50', '-')} ms p99 {lat.get('p99', '-')} ms  (load {r['load']:.1f})"
            )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
