"""The router's side of a reload, over real sockets: a group added with `earliest` gets
the journal's backlog and its member handles it all; a removed group is dropped with its
cursors; a changed partition count is refused and changes nothing."""

from __future__ import annotations

import os

import msgspec
import pytest
import yaml
from conftest import recorder_group
from recorder import read_handled

from nexus import Producer, config
from nexus.common import logs
from nexus.protocol.client import CoordClient
from nexus.router.cursors import CursorStore
from nexus.testing import wait_for


@pytest.fixture
def level_restored():
    """The router thread applies the reload's log level to this whole process."""
    before = logs.current_level()
    yield
    logs.set_level(before)


def test_groups_added_and_removed_live(tmp_path, config_factory, components, level_restored):
    old_out, new_out = tmp_path / "old", tmp_path / "new"
    path = config_factory(workers={"old": recorder_group(old_out)})
    cfg = config.load(path)
    router = components.router(cfg)
    wait_for(lambda: os.path.exists(cfg.coord[len("ipc://") :]), 10, message="router bound")
    client = CoordClient(cfg.coord, 10.0)
    with Producer(cfg.confirm, source="comp") as p:
        sent = {p.send("test.item", {"i": i}, key=f"k{i % 7}") for i in range(500)}
        p.flush(20)

    late = msgspec.structs.replace(cfg.workers["old"], start="latest")
    bad = {**cfg.workers, "old": msgspec.structs.replace(cfg.workers["old"], partitions=4)}
    refused = client.reload(config.to_bytes(msgspec.structs.replace(cfg, workers=bad)))
    kept = set(router.coordinator.groups)
    earliest = msgspec.structs.replace(late, start="earliest", options={"out": str(new_out)})
    new = msgspec.structs.replace(cfg, workers={"new": earliest, "late": late}, log=config.LogConfig(level="debug"))
    os.makedirs(new_out)
    answer = client.reload(config.to_bytes(new))
    status = client.status()
    components.member(new, "new", "new-0")
    wait_for(lambda: {r[1] for r in read_handled(str(new_out))} == sent, 20, message="the backlog handled")
    wait_for(lambda: client.status()["groups"]["new"]["lag"] == 0, 10, message="new group acked")
    wait_for(lambda: "old" not in CursorStore(router.cursors.path).load(quarantine=False), 10, message="saved")

    assert "partitions 16 -> 4" in refused["error"] and kept == {"old"}
    assert answer["groups"] == {"added": ["new", "late"], "removed": ["old"], "rerouted": []}
    assert set(status["groups"]) == {"new", "late"}
    assert status["groups"]["new"]["lag"] == 500 and status["groups"]["late"]["lag"] == 0
    assert status["groups"]["late"]["cursor_min"] == router.journal.last_seq
    assert router.config.workers == new.workers and router.config.log.level == "debug"


def test_sighup_rereads_the_file_only_for_a_router_run_alone(tmp_path, config_factory, components, level_restored):
    """(the flag is what the router's SIGHUP handler sets; the loop acts on it)"""
    path = config_factory(workers={"a": recorder_group(tmp_path / "a")})
    cfg = config.load(path)
    router = components.router(cfg)
    wait_for(lambda: os.path.exists(cfg.coord[len("ipc://") :]), 10, message="router bound")
    raw = yaml.safe_load(path.read_text())
    raw["workers"]["b"] = recorder_group(tmp_path / "b")
    path.write_text(yaml.safe_dump(raw))
    router.reload_requested = True  # alone: today's behaviour, the file is re-read
    wait_for(lambda: set(router.coordinator.groups) == {"a", "b"}, 10, message="group b added on SIGHUP")
    router.launcher_pid = os.getpid()  # as if a launcher ran it: ignored
    raw["workers"].pop("a")
    path.write_text(yaml.safe_dump(raw))
    router.reload_requested = True
    wait_for(lambda: not router.reload_requested, 10, message="the SIGHUP taken")
    CoordClient(cfg.coord, 10.0).status()  # answered on a later loop turn: the SIGHUP's is over
    assert set(router.coordinator.groups) == {"a", "b"} and set(router.config.workers) == {"a", "b"}
