"""The black box: what a child writes is what the launcher reads, across processes."""

from __future__ import annotations

import multiprocessing
import os
import stat

import pytest

from nexus.common.blackbox import BlackBox, InFlight, path_for


def _child(path: str, partition: int, seq: int) -> None:
    box = BlackBox.open(path)
    box.started()
    box.mark(partition, seq)
    os._exit(9)  # dies mid-handler, as a poison event makes it


def test_a_dead_childs_box_names_its_event(tmp_path):
    path = path_for(str(tmp_path), "g-0")
    box = BlackBox.create(path)
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
    assert box.last_beat() == 0.0 and box.inflight() == []
    proc = multiprocessing.get_context("spawn").Process(target=_child, args=(path, 7, 4242))
    proc.start()
    proc.join(30)
    assert proc.exitcode == 9
    assert box.pid() == proc.pid and box.last_beat() > 0
    assert box.inflight() == [InFlight(0, 7, 4242)]
    box.reset()
    assert box.inflight() == [] and box.pid() == 0 and box.last_beat() == 0.0


def test_slots_for_concurrent_handlers(tmp_path):
    box = BlackBox.create(str(tmp_path / "b.box"), slots=4)
    reader = BlackBox.open(str(tmp_path / "b.box"))
    a, b = box.begin(1, 10), box.begin(2, 20)
    assert {(i.partition, i.seq) for i in reader.inflight()} == {(1, 10), (2, 20)}
    box.end(a)
    assert [(i.partition, i.seq) for i in reader.inflight()] == [(2, 20)]
    box.end(b)
    assert reader.inflight() == []


def test_not_a_box(tmp_path):
    (tmp_path / "x").write_bytes(b"\0" * 64)
    with pytest.raises(ValueError, match="not a black box"):
        BlackBox.open(str(tmp_path / "x"))
