"""Fixtures of the micro suite (`python -m pytest bench/ -q`).

Each benchmark that works on a batch uses BATCH events (Nexus' own batch size,
nexus.producer.outbox.MAX_BATCH_EVENTS) and records `per_event_ns` in extra_info, so
`--benchmark-json` carries per-event costs next to per-call times.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

import pytest
import yaml

from nexus.producer.outbox import MAX_BATCH_EVENTS
from nexus.protocol.events import Event, encode, new_id

REPO = str(Path(__file__).resolve().parent.parent)
if REPO not in sys.path:
    sys.path.insert(0, REPO)

BATCH = MAX_BATCH_EVENTS
PAD = "x" * 16


def make_event(n: int, type_: str = "bench.event", key: str | None = None) -> Event:
    return Event(type=type_, source="bench-0", payload={"n": n, "pad": PAD}, id=new_id(), time=time.time(), key=key)


@pytest.fixture(scope="session")
def raw_events() -> list[bytes]:
    """BATCH encoded untyped events, as a producer sends them."""
    return [encode(make_event(i)) for i in range(BATCH)]


@pytest.fixture(scope="session")
def raw_typed_events() -> list[bytes]:
    """BATCH encoded events with a contract (file.created), as the file producer sends them."""
    import nexus.contracts  # noqa: F401  registers the built-in contracts

    return [
        encode(
            Event(
                type="file.created",
                source="file:inbox",
                payload={"path": f"/tmp/inbox/f{i}.txt", "watcher": "inbox", "size": i},
                id=new_id(),
                time=time.time(),
            )
        )
        for i in range(BATCH)
    ]


def write_config(directory: Path, groups: int = 1, partitions: int = 16) -> Path:
    cfg = {
        "data_dir": "./var",
        "router": {
            "ingest": "ipc://{data_dir}/run/ingest",
            "confirm": "ipc://{data_dir}/run/confirm",
            "journal": {"fsync": "never"},
        },
        "contracts": ["nexus.contracts"],
        "contracts_untyped": ["bench.*"],
        "http": {"listen": ""},  # no HTTP process: the figures as before (and no fixed port)
        "workers": {
            f"bench{g}": {
                "handler": "bench.noop:Counter",
                "subscribe": ["bench.*"],
                "partitions": partitions,
                "start": "earliest",
                "options": {"out": str(directory / "out"), "group": f"bench{g}", "sample_every": 50},
            }
            for g in range(groups)
        },
    }
    (directory / "out").mkdir(parents=True, exist_ok=True)
    path = directory / "nexus.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


@pytest.fixture
def bench_config(tmp_path):
    from nexus import config

    return config.load(write_config(tmp_path))


def per_event(benchmark, events: int) -> None:
    """Record the mean cost per event of the last benchmark in extra_info."""
    stats = getattr(benchmark, "stats", None)
    if stats is not None:
        benchmark.extra_info["per_event_ns"] = round(stats.stats.mean / events * 1e9, 1)
