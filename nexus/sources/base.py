"""What a source kind implements: the plugin interface of `producers:`.

A kind is a `Source` subclass with a `Config` struct, registered under the
`nexus.sources` entry-point group (the built-ins in pyproject.toml, a plugin in its own):

    [project.entry-points."nexus.sources"]
    ticker = "nexus_source_ticker:TickerSource"

`producers: {NAME: {kind: ticker, ...}}` then runs it in its own supervised process:
the config loader decodes the entry into `Config` (a typo is a config error naming
the key) and calls `check`; the producer process makes one instance and calls `run`
until SIGTERM sets `stop`. examples/nexus-source-ticker is a complete one.
"""

from __future__ import annotations

import threading
from typing import Any, ClassVar, Generic, Protocol, TypeVar

from nexus.config import Config as PipelineConfig
from nexus.config import SourceConfig

C = TypeVar("C", bound=SourceConfig)


class Sink(Protocol):
    """Where a source sends its events (the producer's confirm-mode connection)."""

    def emit(self, type: str, payload: Any, key: str | None = None, priority: int = 5) -> str:
        """Send one event (checked here against its contract, if this process imported
        one; the router checks it in any case); returns its id. Blocks while the
        producer's window of unconfirmed events is full."""
        ...

    def flush(self, timeout: float = 30.0) -> None:
        """Return once the router has journaled everything emitted so far: call it before
        persisting a position (an IMAP UID), so a crash re-emits and never skips."""
        ...


class Source(Generic[C]):
    """One configured producer of a kind. Subclass it with `Config` set to the kind's
    SourceConfig subclass (`class Ticker(Source[TickerConfig]): Config = TickerConfig`)."""

    Config: ClassVar[type[SourceConfig]] = SourceConfig

    def __init__(self, name: str, spec: C, config: PipelineConfig) -> None:
        """`name`: the key under `producers:`; `spec`: its decoded Config; `config`: the
        whole pipeline config (data_dir for state, resolve() for relative paths)."""
        self.name = name
        self.spec = spec
        self.config = config

    @classmethod
    def check(cls, name: str, spec: C, config: PipelineConfig) -> None:
        """Checks the struct's types cannot express, run when the config is loaded (by
        `nexus` commands too, so: no side effects, no environment). Raise
        ConfigError("producers.NAME.KEY: what is wrong"); the loader prefixes the file."""

    def run(self, sink: Sink, stop: threading.Event) -> None:
        """Emit events until `stop` is set, then return (blocking: the process is the
        source's own; an asyncio source runs its loop in here). An exception ends the
        process and the launcher restarts it; a ConfigError is not retried."""
        raise NotImplementedError

    def status(self) -> dict[str, Any]:
        """Extra detail for `nexus status` (JSON-able), asked every second from another thread."""
        return {}
