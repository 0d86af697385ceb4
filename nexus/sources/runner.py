"""The producer process: one configured source, run until SIGTERM.

It makes the source (its kind's class from the registry), hands it a sink on a
confirm-mode Producer, and every second writes what `nexus status` shows for it.
"""

from __future__ import annotations

import json
import os
import threading
import time
from typing import Any

import structlog

from nexus import config as config_mod
from nexus.common import private
from nexus.config import Config
from nexus.errors import ConfigError
from nexus.producer.client import Producer
from nexus.protocol.curve import client_keys
from nexus.sources.base import Source


class ProducerSink:
    """The sink a source emits to: the Producer, counted for `nexus status`."""

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


def _report_status(config: Config, source: Source, sink: ProducerSink, stop: threading.Event) -> None:
    """Every second, what `nexus status` shows for this producer (a small JSON file
    the launcher reads): counters plus whatever the source reports."""
    path = status_path(config, source.name)
    private.makedirs(os.path.dirname(path))
    while True:
        detail = {"emitted": sink.emitted, "last_emit": sink.last_emit}
        detail.update(source.status())
        tmp = f"{path}.tmp"
        with os.fdopen(private.create(tmp), "w") as f:  # 0600, like every file in the data dir
            json.dump(detail, f)
        os.replace(tmp, path)
        if stop.wait(1.0):
            return


def main(config: Config, name: str) -> None:
    from nexus.common.process import stop_on_signals

    spec = config.producers[name]
    kind = spec.kind
    try:
        cls = config_mod.source_class(kind)
    except ConfigError as exc:  # validated at load; uninstalled since?
        raise ConfigError(f"producers.{name}.kind: {exc}") from None
    source: Source = cls(name, spec, config)
    stop = threading.Event()
    stop_on_signals(stop)
    log = structlog.get_logger("nexus.producer").bind(producer=name, kind=kind)
    producer = Producer(
        config.confirm,
        source=f"{kind}:{name}",
        max_event_bytes=config.router.max_event_bytes,
        curve=client_keys(config),
    )
    sink = ProducerSink(producer)
    log.info("producer_started")
    reporter = threading.Thread(target=_report_status, args=(config, source, sink, stop), daemon=True)
    reporter.start()
    try:
        source.run(sink, stop)
    finally:
        stop.set()
        reporter.join(2)
        producer.close(timeout=config.shutdown_timeout)
        log.info("producer_stopped", emitted=sink.emitted)
