"""`python -m nexus.launch` under `engine: nats` with `nats.embedded_server`: the launcher
starts its own nats-server first, the ingest and the members run on it, the CLI reads the
cluster, and the server stops last."""

from __future__ import annotations

import json
import subprocess
import sys
from collections import Counter

import pytest
from conftest import recorder_group
from recorder import read_handled

from nexus import Producer, config
from nexus.jetstream.localserver import _port_open, free_ports
from nexus.testing import pid_alive, wait_for

pytestmark = pytest.mark.system
pytest.importorskip("nexus.jsingest.process", reason="the nats engine's ingest (branch jsingest) is not merged yet")
pytest.importorskip("nexus.jsmember.runtime", reason="the nats engine's members (branch jsmember) are not merged yet")


def nexus_cli(*args, timeout: float = 30) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "nexus", *args], capture_output=True, text=True, timeout=timeout)


def test_embedded_server_pipeline_status_journal_and_stop(config_factory, launched, tmp_path):
    port = free_ports(1)[0]
    out = tmp_path / "out"
    path = config_factory(
        engine="nats",
        nats={"servers": [f"nats://127.0.0.1:{port}"], "embedded_server": True, "shards": 8},
        workers={"rec": recorder_group(out, processes=2, partitions=4)},
    )
    p = launched(path)
    cfg = config.load(path)
    with Producer(cfg.confirm, source="nats-launch") as producer:
        ids = {producer.send("test.item", {"i": i}, key=f"k{i % 5}") for i in range(200)}
        producer.flush(20)
    wait_for(lambda: len(read_handled(str(out))) >= len(ids), 30, message="all events handled")
    handled = Counter(row[1] for row in read_handled(str(out)))
    print(f"sent={len(ids)} handled={sum(handled.values())} distinct={len(handled)}")
    assert set(handled) == ids

    status = nexus_cli("status", "--json", "-c", str(path))
    assert status.returncode == 0, status.stderr
    data = json.loads(status.stdout)
    procs = {proc["name"]: proc for proc in data["processes"]}
    assert set(procs) == {"nats", "router", "rec-0", "rec-1"}
    assert all(proc["state"] == "running" and proc["pid"] for proc in procs.values())

    # (the ingest answers status from a snapshot of the cluster up to 2 s old: the takes
    # may be newer than the events' handling shows)
    def assigned():
        rec = nexus_status(path)["groups"]["rec"]
        return len(rec["members"]) == 2 and rec["unassigned"] == 0

    wait_for(assigned, 20, 0.2, "2 members, every partition assigned")
    wait_for(lambda: nexus_status(path)["groups"]["rec"]["lag"] == 0, 20, 0.2, "lag 0")
    assert data["engine"]["reachable"] and data["engine"]["leader"]
    assert data["engine"]["last_seq"] >= len(ids)
    assert data["health"] == {"live": True, "ready": True, "reasons": []}
    text = nexus_cli("status", "-c", str(path)).stdout
    assert "engine nats: stream NEXUS leader=" in text and "health: live, ready" in text

    info = json.loads(nexus_cli("journal", "info", "--json", "-c", str(path)).stdout)
    assert info["groups"]["rec"]["lag"] == 0 and len(info["groups"]["rec"]["owners"]) == 4

    nats_pid = procs["nats"]["pid"]
    assert p.stop() == 0
    assert not pid_alive(nats_pid) and not _port_open("127.0.0.1", port)


def nexus_status(path) -> dict:
    return json.loads(nexus_cli("status", "--json", "-c", str(path)).stdout)
