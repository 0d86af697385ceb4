"""The file producer: file.created / modified / deleted / moved from a watchdog Observer.

Watchdog calls back in its own thread; the callback only enqueues raw events, and
the run() thread filters, debounces and emits, so the sink is used from one thread.
Directory events are ignored (with recursive=True watchdog still watches new
subdirectories, so the files in them are reported).
"""

from __future__ import annotations

import fnmatch
import os
import queue
import threading
import time

import msgspec
import structlog
from watchdog.events import (
    FileCreatedEvent,
    FileDeletedEvent,
    FileModifiedEvent,
    FileMovedEvent,
    FileSystemEvent,
    FileSystemEventHandler,
)
from watchdog.observers import Observer

from nexus.config import Config, Duration, SourceConfig
from nexus.errors import ConfigError
from nexus.sources.base import Sink, Source

log = structlog.get_logger("nexus.producer.file")

POLL = 0.1  # longest wait for a raw event, so `stop` is noticed promptly
MAX_BATCH = 10_000  # raw events taken per round, so a flood cannot starve stop
JOIN_TIMEOUT = 5.0
# Only these reach the handler (watchdog also narrows the inotify mask to them).
EVENT_FILTER = [FileCreatedEvent, FileModifiedEvent, FileDeletedEvent, FileMovedEvent]


class FileConfig(SourceConfig):
    paths: list[str]
    patterns: list[str] = msgspec.field(default_factory=lambda: ["*"])
    ignore: list[str] = msgspec.field(default_factory=lambda: [".*", "*~", "*.swp", "*.tmp"])
    recursive: bool = False
    debounce: Duration = Duration(0.2)
    create_missing: bool = True


# How a pending change merges with the next raw event on the same path; pairs not
# listed take the new kind. created+deleted within the window emits nothing: the
# file never existed for long enough to be handled, and a created event for it
# would name a file that is already gone.
_MERGE: dict[tuple[str, str], str | None] = {
    ("created", "modified"): "created",
    ("created", "created"): "created",
    ("created", "deleted"): None,
    ("deleted", "created"): "modified",  # replaced within the window
}


class Debouncer:
    """Per-path trailing-edge debounce; pure logic driven by the run() thread.

    A change is emitted once its path has been quiet for `delay` seconds, or at
    the latest `max_delay` after its first raw event, so a file written without
    pause (a log) still gets reported now and then.
    """

    def __init__(self, delay: float, max_delay: float):
        self.delay, self.max_delay = delay, max_delay
        # path -> (kind, first_seen, last_seen); insertion order is last activity
        self._pending: dict[str, tuple[str, float, float]] = {}
        self._ready: list[tuple[str, str, str | None]] = []  # (kind, path, src_path)

    def add(self, kind: str, path: str, now: float) -> None:
        entry = self._pending.pop(path, None)
        first = now
        if entry is not None:
            first = entry[1]
            merged = _MERGE.get((entry[0], kind), kind)
            if merged is None:
                return
            kind = merged
        self._pending[path] = (kind, first, now)

    def move(self, src: str, dest: str, src_ok: bool, dest_ok: bool, now: float) -> None:
        """A rename; src_ok/dest_ok say whether each name passes the filters."""
        if not dest_ok:
            if src_ok:
                self.add("deleted", src, now)  # moved out of view
            return
        if not src_ok:
            self.add("created", dest, now)  # e.g. atomic save from "x.tmp"
            return
        entry = self._pending.pop(src, None)
        if entry is not None and entry[0] == "created":
            self.add("created", dest, now)  # created then renamed: one event
            return
        # Flush what is pending for either name first so the move comes after it.
        for path, pending in ((src, entry), (dest, self._pending.pop(dest, None))):
            if pending is not None:
                self._ready.append((pending[0], path, None))
        self._ready.append(("moved", dest, src))

    def next_deadline(self) -> float | None:
        if self._ready:
            return 0.0
        return min(
            (min(last + self.delay, first + self.max_delay) for _, first, last in self._pending.values()), default=None
        )

    def pop_ready(self, now: float) -> list[tuple[str, str, str | None]]:
        out, self._ready = self._ready, []
        for path, (kind, first, last) in list(self._pending.items()):
            if now - last >= self.delay or now - first >= self.max_delay:
                del self._pending[path]
                out.append((kind, path, None))
        return out

    def drain(self) -> list[tuple[str, str, str | None]]:
        out, self._ready = self._ready, []
        out += [(kind, path, None) for path, (kind, _, _) in self._pending.items()]
        self._pending.clear()
        return out


def matches(path: str, patterns: list[str], ignore: list[str]) -> bool:
    base = os.path.basename(path)
    return any(fnmatch.fnmatch(base, p) for p in patterns) and not any(fnmatch.fnmatch(base, p) for p in ignore)


def watch_paths(name: str, spec: FileConfig, config: Config, where: str = "") -> list[str]:
    """Resolve (and create, if allowed) the watched folders; ConfigError names the path."""
    if not spec.paths:
        raise ConfigError(f"{where}producers.{name}.paths: no paths to watch")
    out: list[str] = []
    for raw in spec.paths:
        path = config.resolve(raw)
        if not os.path.exists(path):
            if not spec.create_missing:
                raise ConfigError(
                    f"{where}producers.{name}.paths: {path} does not exist (create it or set create_missing: true)"
                )
            try:
                os.makedirs(path, exist_ok=True)
            except OSError as exc:
                raise ConfigError(f"{where}producers.{name}.paths: cannot create {path}: {exc.strerror}") from None
            log.info("file_watch_path_created", producer=name, path=path)
        elif not os.path.isdir(path):
            raise ConfigError(f"{where}producers.{name}.paths: {path} is not a directory")
        if path not in out:
            out.append(path)
    return out


class _Enqueue(FileSystemEventHandler):
    """Runs in watchdog's thread: only hands raw file events over."""

    def __init__(self, events: queue.SimpleQueue):
        self.events = events

    def on_any_event(self, event: FileSystemEvent) -> None:
        if not event.is_directory and event.event_type in ("created", "modified", "deleted", "moved"):
            dest = os.fsdecode(event.dest_path) if event.dest_path else None
            self.events.put((event.event_type, os.fsdecode(event.src_path), dest))


def _payload(name: str, kind: str, path: str, src: str | None) -> dict | None:
    if kind == "moved":
        return {"path": path, "src_path": src, "watcher": name, "is_directory": False}
    size = mtime = None
    if kind != "deleted":
        try:
            st = os.stat(path)
        except OSError:
            pass  # gone again; report what we know
        else:
            size, mtime = st.st_size, st.st_mtime
    return {"path": path, "watcher": name, "is_directory": False, "size": size, "mtime": mtime}


class FileSource(Source[FileConfig]):
    Config = FileConfig

    def run(self, sink: Sink, stop: threading.Event) -> None:
        name, spec, config = self.name, self.spec, self.config
        paths = watch_paths(name, spec, config, f"{config.source}: " if config.source else "")
        logger = log.bind(producer=name)
        debouncer = Debouncer(spec.debounce, max(10 * spec.debounce, 1.0))
        events: queue.SimpleQueue = queue.SimpleQueue()

        def feed(item: tuple[str, str, str | None]) -> None:
            kind, src, dest = item
            now = time.monotonic()
            if kind == "moved" and dest is not None:
                debouncer.move(
                    src, dest, matches(src, spec.patterns, spec.ignore), matches(dest, spec.patterns, spec.ignore), now
                )
            elif matches(src, spec.patterns, spec.ignore):
                debouncer.add(kind, src, now)

        def emit(ready: list[tuple[str, str, str | None]]) -> None:
            for kind, path, src in ready:
                sink.emit(f"file.{kind}", _payload(name, kind, path, src), key=path)
                logger.debug("file_event_emitted", type=f"file.{kind}", path=path)

        handler = _Enqueue(events)
        observer = Observer()
        observer.name = f"nexus-file-{name}"  # tests wait for this thread: watches are set
        for path in paths:
            observer.schedule(handler, path, recursive=spec.recursive, event_filter=EVENT_FILTER)
        try:
            observer.start()  # inside try: a failed start may have begun some emitters
            logger.info(
                "file_watch_started",
                paths=paths,
                recursive=spec.recursive,
                patterns=spec.patterns,
                debounce=spec.debounce,
            )
            while not stop.is_set():
                deadline = debouncer.next_deadline()
                timeout = POLL if deadline is None else min(POLL, max(0.0, deadline - time.monotonic()))
                try:
                    feed(events.get(timeout=timeout))
                    for _ in range(MAX_BATCH):
                        feed(events.get_nowait())
                except queue.Empty:
                    pass
                emit(debouncer.pop_ready(time.monotonic()))
        finally:
            observer.stop()
            if observer.is_alive():
                observer.join(JOIN_TIMEOUT)
        # Stopped cleanly: report what was still waiting for quiet, rather than lose it.
        while True:
            try:
                feed(events.get_nowait())
            except queue.Empty:
                break
        emit(debouncer.drain())
        logger.info("file_watch_stopped")
