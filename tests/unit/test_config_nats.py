"""`engine: nats` in the config: defaults, the example, and one line per mistake."""

from __future__ import annotations

from pathlib import Path

import pytest

from nexus import config
from nexus.errors import ConfigError

REPO = Path(__file__).parents[2]


def _load(tmp_path: Path, text: str):
    path = tmp_path / "nexus.yaml"
    path.write_text(text)
    return config.load(path)


def _error(tmp_path: Path, text: str) -> str:
    with pytest.raises(ConfigError) as info:
        _load(tmp_path, text)
    return str(info.value)


def test_defaults_and_embedded_is_the_default_engine(tmp_path):
    cfg = _load(tmp_path, "")
    assert cfg.engine == "embedded"
    cfg = _load(tmp_path, "engine: nats\n")
    n = cfg.nats
    assert (n.servers, n.stream, n.replicas, n.shards, n.embedded_server) == (
        ["nats://127.0.0.1:4222"],
        "NEXUS",
        1,
        64,
        False,
    )
    assert n.dedup_window == 120 and n.max_age == 7 * 86400


def test_the_example_loads_with_its_own_server():
    cfg = config.load(REPO / "config/examples/nats.yaml")
    assert cfg.engine == "nats" and cfg.nats.embedded_server and cfg.nats.replicas == 1
    assert cfg.data_dir == str((REPO / "var/nats-demo").resolve())
    assert set(cfg.workers) == {"console"} and cfg.workers["console"].handler == "workers.console:handle"
    assert set(cfg.producers) == {"heartbeat", "inbox"}


@pytest.mark.parametrize(
    "text,message",
    [
        ("engine: kafka\n", "engine"),
        ("engine: nats\nnats: {stream: 'a.b'}\n", "nats.stream: use 1-32 letters, digits, '-' or '_' (got 'a.b')"),
        ("engine: nats\nnats: {servers: []}\n", "nats.servers: name at least one server URL"),
        (
            "engine: nats\nnats: {servers: ['http://x:1']}\n",
            "nats.servers: 'http://x:1' is not a nats://host:port or tls://host:port URL",
        ),
        ("engine: nats\nnats: {tls: {cert: c.pem}}\n", "nats.tls: cert and key go together"),
        (
            "engine: nats\nnats: {embedded_server: true, replicas: 3}\n",
            "nats.replicas: 3 copies need a cluster; embedded_server starts one node (use 1)",
        ),
        ("engine: nats\nnats: {replicas: 7}\n", "nats.replicas"),
        (
            "engine: nats\nnats: {shards: 8}\nworkers: {w: {handler: 'm:f', partitions: 3}}\n",
            "workers.w.partitions (3) must divide nats.shards (8)",
        ),
        ("engine: nats\nnats: {typo: 1}\n", "typo"),
    ],
)
def test_each_mistake_is_one_line(tmp_path, text, message):
    error = _error(tmp_path, text)
    assert message in error and "\n" not in error, error


def test_partitions_need_not_divide_shards_under_the_embedded_engine(tmp_path):
    cfg = _load(tmp_path, "nats: {shards: 8}\nworkers: {w: {handler: 'm:f', partitions: 3}}\n")
    assert cfg.workers["w"].partitions == 3
