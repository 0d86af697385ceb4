"""The file producer: the pure Debouncer, and run() with a real watchdog Observer.

"Nothing else arrived" is checked with a sentinel file written afterwards: raw events
reach the producer in order, so once the sentinel's event is out, any later event of
an earlier file would have been emitted too.
"""

from __future__ import annotations

import itertools
import os
import threading

import msgspec
import pytest

from nexus import config as nexus_config
from nexus.config import Config, Duration
from nexus.contracts import FileChanged, FileMoved
from nexus.errors import ConfigError
from nexus.sources.file import Debouncer, FileConfig, FileSource
from nexus.testing import CollectingSink, wait_for

_names = itertools.count()


@pytest.fixture
def watched(tmp_path) -> str:
    path = tmp_path / "inbox"
    path.mkdir()
    return os.path.realpath(path)


@pytest.fixture
def config(tmp_path) -> Config:
    return msgspec.structs.replace(Config(), source=str(tmp_path / "nexus.yaml"))


class Running:
    def __init__(self, name: str, sink: CollectingSink, stop: threading.Event, thread: threading.Thread):
        self.name, self.sink, self.stop, self.thread = name, sink, stop, thread

    def events_for(self, path: str) -> list[tuple[str, dict]]:
        with self.sink._lock:
            return [(t, p) for t, p, _ in self.sink.events if p["path"] == path]

    def wait_event(self, path: str, type_: str | None = None) -> dict:
        def found():
            return next((p for t, p in self.events_for(path) if type_ in (None, t)), None)

        return wait_for(found, timeout=10, message=f"{type_ or 'an event'} for {path}")

    def sentinel(self, folder: str) -> None:
        """Write a fresh file and wait for its event (see the module docstring)."""
        path = os.path.join(folder, f"sentinel-{next(_names)}.txt")
        with open(path, "w") as f:
            f.write("s")
        self.wait_event(path, "file.created")


@pytest.fixture
def start(config):
    """Run file.run() in a thread, wait until its observer watches; teardown stops it."""
    running = []

    def _start(spec: FileConfig, cfg: Config | None = None) -> Running:
        name = f"watch-{next(_names)}"
        sink, stop, errors = CollectingSink(), threading.Event(), []

        def target() -> None:
            try:
                FileSource(name, spec, cfg or config).run(sink, stop)
            except BaseException as exc:  # surfaced below and by the teardown
                errors.append(exc)

        thread = threading.Thread(target=target, name=f"test-{name}", daemon=True)
        thread.start()
        running.append((thread, stop, errors))
        # watches are in place once the observer thread runs (run() names it)
        wait_for(
            lambda: errors or any(t.name == f"nexus-file-{name}" and t.is_alive() for t in threading.enumerate()),
            timeout=10,
            message="the observer to start",
        )
        assert not errors, errors
        return Running(name, sink, stop, thread)

    yield _start
    for thread, stop, errors in running:
        stop.set()
        thread.join(10)
        assert not thread.is_alive(), "file.run() did not return after stop"
        assert not errors, errors


def spec(**kw) -> FileConfig:
    kw.setdefault("paths", ["./inbox"])
    kw.setdefault("debounce", Duration(0.1))
    return FileConfig(**kw)


# -- Debouncer (pure) ------------------------------------------------------------
def test_debouncer_created_absorbs_modified_until_quiet():
    d = Debouncer(delay=1.0, max_delay=10.0)
    d.add("created", "/a", 0.0)
    d.add("modified", "/a", 0.5)
    d.add("modified", "/a", 1.2)
    assert d.pop_ready(2.1) == []  # last raw event at 1.2: not quiet yet
    assert d.next_deadline() == pytest.approx(2.2)
    assert d.pop_ready(2.2) == [("created", "/a", None)]
    assert d.pop_ready(100) == []


def test_debouncer_merges():
    d = Debouncer(delay=1.0, max_delay=10.0)
    d.add("created", "/gone", 0.0)
    d.add("deleted", "/gone", 0.1)  # never existed for long: nothing
    d.add("deleted", "/replaced", 0.0)
    d.add("created", "/replaced", 0.1)
    d.add("modified", "/removed", 0.0)
    d.add("deleted", "/removed", 0.1)
    assert sorted(d.pop_ready(5)) == [("deleted", "/removed", None), ("modified", "/replaced", None)]


def test_debouncer_max_delay_reports_a_file_that_never_goes_quiet():
    d = Debouncer(delay=1.0, max_delay=3.0)
    for i in range(30):
        d.add("modified", "/log", i * 0.5)
        if i * 0.5 >= 3.0:
            break
    assert d.pop_ready(3.0) == [("modified", "/log", None)]


def test_debouncer_moves():
    d = Debouncer(delay=1.0, max_delay=10.0)
    d.move("/a.txt", "/b.txt", True, True, 0.0)
    assert d.next_deadline() == 0.0
    assert d.pop_ready(0.0) == [("moved", "/b.txt", "/a.txt")]
    d.move("/x.tmp", "/x.txt", False, True, 0.0)  # atomic save: a created x.txt
    d.move("/y.txt", "/y.tmp", True, False, 0.0)  # moved out of view: y.txt deleted
    d.add("created", "/c.part", 0.0)
    d.move("/c.part", "/c.txt", True, True, 0.0)  # created then renamed: one event
    d.add("modified", "/m.txt", 0.0)
    d.move("/m.txt", "/n.txt", True, True, 0.1)  # pending change goes out before the move
    assert d.pop_ready(0.1) == [("modified", "/m.txt", None), ("moved", "/n.txt", "/m.txt")]
    assert sorted(d.drain()) == [("created", "/c.txt", None), ("created", "/x.txt", None), ("deleted", "/y.txt", None)]


# -- run() with a real observer --------------------------------------------------------
def test_created_file(start, watched):
    run = start(spec())
    path = os.path.join(watched, "a.txt")
    with open(path, "wb") as f:
        f.write(b"hello")
    payload = run.wait_event(path, "file.created")
    msgspec.convert(payload, FileChanged)
    assert payload["size"] == 5 and payload["mtime"] == os.stat(path).st_mtime
    assert payload["watcher"] == run.name and payload["is_directory"] is False
    run.sentinel(watched)
    assert [t for t, _ in run.events_for(path)] == ["file.created"]
    assert [k for t, p, k in run.sink.events if p["path"] == path] == [path]


@pytest.mark.parametrize("exists", [False, True])
def test_burst_of_writes_is_one_event(start, watched, exists):
    path = os.path.join(watched, "burst.txt")
    if exists:
        open(path, "w").close()
    # a long debounce so a loaded machine never leaves a quiet gap inside the burst
    run = start(spec(debounce=Duration(1.0)))
    for i in range(50):
        with open(path, "a") as f:
            f.write(f"line {i}\n")
    expected = "file.modified" if exists else "file.created"
    payload = run.wait_event(path, expected)
    run.sentinel(watched)
    assert [t for t, _ in run.events_for(path)] == [expected]
    assert payload["size"] == os.path.getsize(path)


def test_patterns_and_ignore(start, watched):
    run = start(spec(patterns=["*.txt", "*.csv"], ignore=["skip*", ".*"]))
    for name in ("a.log", "skip.txt", ".hidden.txt", "data.csv"):
        with open(os.path.join(watched, name), "w") as f:
            f.write("x")
    run.wait_event(os.path.join(watched, "data.csv"), "file.created")
    run.sentinel(watched)
    names = {os.path.basename(p["path"]) for _, p, _ in run.sink.events}
    assert names == {"data.csv"} | {n for n in names if n.startswith("sentinel-")}
    assert len(names) == 2


# watchdog warns when it races itself adding the watch of a fresh subdirectory
# (from the parent's scan and from the subdirectory's own IN_CREATE); it keeps one.
@pytest.mark.filterwarnings("ignore:Callback with id:RuntimeWarning")
def test_recursive_watches_new_subdirectories(start, watched):
    run = start(spec(recursive=True))
    deep = os.path.join(watched, "sub", "deeper")
    os.makedirs(deep)
    path = os.path.join(deep, "x.txt")
    with open(path, "w") as f:
        f.write("deep")
    payload = run.wait_event(path, "file.created")
    assert payload["size"] == 4
    assert all(not p["is_directory"] for _, p, _ in run.sink.events)  # no directory events


def test_not_recursive_ignores_subdirectories(start, watched):
    os.mkdir(os.path.join(watched, "sub"))
    run = start(spec(recursive=False))
    with open(os.path.join(watched, "sub", "x.txt"), "w") as f:
        f.write("x")
    run.sentinel(watched)
    assert all(os.path.dirname(p["path"]) == watched for _, p, _ in run.sink.events)
    assert len(run.sink.events) == 1


def test_deleted_file(start, watched):
    path = os.path.join(watched, "old.txt")
    with open(path, "w") as f:
        f.write("x")
    run = start(spec())
    os.remove(path)
    payload = run.wait_event(path, "file.deleted")
    msgspec.convert(payload, FileChanged)
    assert payload["size"] is None and payload["mtime"] is None


def test_created_then_deleted_within_debounce_emits_nothing(start, watched):
    run = start(spec(debounce=Duration(1.0)))
    path = os.path.join(watched, "brief.txt")
    with open(path, "w") as f:
        f.write("x")
    os.remove(path)
    run.sentinel(watched)
    assert run.events_for(path) == []


def test_moved_file(start, watched):
    src, dest = os.path.join(watched, "a.txt"), os.path.join(watched, "b.txt")
    with open(src, "w") as f:
        f.write("x")
    run = start(spec())
    os.rename(src, dest)
    payload = run.wait_event(dest, "file.moved")
    msgspec.convert(payload, FileMoved)
    assert payload == {"path": dest, "src_path": src, "watcher": run.name, "is_directory": False}
    assert [k for t, p, k in run.sink.events if t == "file.moved"] == [dest]


def test_moves_across_the_filters(start, watched):
    kept, hidden = os.path.join(watched, "kept.txt"), os.path.join(watched, "kept.txt.tmp")
    with open(kept, "w") as f:
        f.write("x")
    run = start(spec(ignore=["*.tmp"]))
    os.rename(kept, hidden)  # out of view: deleted
    assert run.wait_event(kept, "file.deleted")
    with open(hidden, "a") as f:
        f.write("more")
    os.rename(hidden, kept)  # atomic save into view: created
    payload = run.wait_event(kept, "file.created")
    assert payload["size"] == 5
    assert all(not p["path"].endswith(".tmp") for _, p, _ in run.sink.events)


def test_stop_returns_promptly_and_emits_pending_changes(start, watched):
    moved_src = os.path.join(watched, "m1.txt")
    open(moved_src, "w").close()
    run = start(spec(debounce=Duration(30)))
    pending = os.path.join(watched, "pending.txt")
    with open(pending, "w") as f:
        f.write("p")
    # moves are not debounced: once this one is out, pending.txt's raw event was taken
    os.rename(moved_src, os.path.join(watched, "m2.txt"))
    run.wait_event(os.path.join(watched, "m2.txt"), "file.moved")
    assert run.events_for(pending) == []
    run.stop.set()
    run.thread.join(5)
    assert not run.thread.is_alive()
    assert [t for t, _ in run.events_for(pending)] == ["file.created"]


# -- paths from the config ------------------------------------------------------------
def test_paths_are_relative_to_the_config_file_and_created(start, tmp_path):
    cfg_file = tmp_path / "conf" / "nexus.yaml"
    cfg_file.parent.mkdir()
    cfg_file.write_text("producers:\n  inbox: {kind: file, paths: [./drop], debounce: 50ms}\n")
    cfg = nexus_config.load(cfg_file)
    drop = os.path.realpath(tmp_path / "conf" / "drop")
    assert not os.path.exists(drop)
    run = start(cfg.producers["inbox"], cfg)
    assert os.path.isdir(drop)
    path = os.path.join(drop, "a.txt")
    open(path, "w").close()
    assert run.wait_event(path, "file.created")["size"] == 0


def test_missing_path_without_create_missing_is_a_config_error(config, tmp_path):
    with pytest.raises(ConfigError, match=r"producers\.w\.paths: .*nope does not exist") as exc:
        FileSource("w", spec(paths=["./nope"], create_missing=False), config).run(CollectingSink(), threading.Event())
    assert str(tmp_path / "nope") in str(exc.value)
    assert not (tmp_path / "nope").exists()


def test_path_that_is_a_file_is_a_config_error(config, tmp_path):
    (tmp_path / "plain").write_text("x")
    with pytest.raises(ConfigError, match=r"producers\.w\.paths: .*plain is not a directory"):
        FileSource("w", spec(paths=["./plain"]), config).run(CollectingSink(), threading.Event())
