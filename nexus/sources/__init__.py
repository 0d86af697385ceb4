"""Built-in producers, each run as a supervised process by the launcher.

A producer module exposes `run(name, spec, config, sink, stop)`: blocking until the
threading.Event `stop` is set. `sink.emit(type, payload, key=None, priority=5)`
sends an event (confirm mode); `sink.flush(timeout)` returns once the router has
journaled everything emitted so far (call it before persisting a position such as
an IMAP UID, so a crash never skips an event).
"""

from __future__ import annotations

import importlib
import json
import os
import threading
import time
from typing import Any

import structlog

from nexus.config import Config
from nexus.producer.client import Producer

KINDS = {"schedule": "nexus.sources.schedule", "file": "nexus.sources.file", "imap": "nexus.sources.imap"}


class Sink:
    def __init__(self, producer: Producer):
        self._producer = producer
        self.emitted = 0
        self.last_emit = 0.0

    def emit(self, type: str, payload: Any, key: str | None = None, priority: int = 5) -> str:
        self.emitted += 1
        self.last_emit = time.time()
        return self._producer.send(type, payload, key=key, priority=priority)

    def flush(self, timeout: float = 30.0) -> None:
        self._producer.flush(timeout)


def status_path(config: Config, name: str) -> str:
    return os.path.join(config.data_dir, "run", "status", f"{name}.json")


def _report_status(config: Config, name: str, module, sink: Sink, stop: threading.Event) -> None:
    """Every second, what `nexus status` shows for this producer (a small JSON file
    the launcher reads): counters plus whatever the module reports."""
    path = status_path(config, name)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    while True:
        detail = {"emitted": sink.emitted, "last_emit": sink.last_emit}
        if hasattr(module, "status"):
            detail.update(module.status(name))
        tmp = f"{path}.tmp"
        with open(tmp, "w") as f:
            json.dump(detail, f)
        os.replace(tmp, path)
        if stop.wait(1.0):
            return


def main(config: Config, name: str) -> None:
    from nexus.common.process import stop_on_signals

    spec = config.producers[name]
    kind = type(spec).__struct_config__.tag
    module = importlib.import_module(KINDS[kind])
    stop = threading.Event()
    stop_on_signals(stop)
    log = structlog.get_logger("nexus.producer").bind(producer=name, kind=kind)
    producer = Producer(config.confirm, source=f"{kind}:{name}", max_event_bytes=config.router.max_event_bytes)
    sink = Sink(producer)
    log.info("producer_started")
    reporter = threading.Thread(target=_report_status, args=(config, name, module, sink, stop), daemon=True)
    reporter.start()
    try:
        module.run(name, spec, config, sink, stop)
    finally:
        stop.set()
        reporter.join(2)
        producer.close(timeout=config.shutdown_timeout)
        log.info("producer_stopped", emitted=sink.emitted)
