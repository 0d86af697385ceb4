"""A source plugin for Nexus: `kind: ticker` emits `example.tick` every `every`,
with a counter that starts at 1 each time the producer process starts.

    producers:
      beat: {kind: ticker, every: 250ms, key: null}
"""

from __future__ import annotations

import threading
import time
from typing import Annotated

import msgspec

from nexus import Contract, contract
from nexus.sources import Duration, Sink, Source, SourceConfig


class TickerConfig(SourceConfig):
    """The keys of a `kind: ticker` entry (an unknown one is a config error)."""

    every: Duration = Duration(1.0)
    key: str | None = None  # the events' partition key (default: the producer's name)

    def __post_init__(self) -> None:  # a ValueError here is a config error naming the entry
        if self.every <= 0:
            raise ValueError("`every` must be positive")


# The payload's contract: list this module under `contracts:` so the router knows it.
@contract("example.tick")
class Tick(Contract, frozen=True):
    name: Annotated[str, msgspec.Meta(min_length=1, max_length=256)]
    n: Annotated[int, msgspec.Meta(ge=1)]
    at: float  # unix seconds


class TickerSource(Source[TickerConfig]):
    Config = TickerConfig

    def run(self, sink: Sink, stop: threading.Event) -> None:
        n = 0
        while not stop.wait(self.spec.every):  # wakes at once when the process is stopped
            n += 1
            sink.emit("example.tick", {"name": self.name, "n": n, "at": time.time()}, key=self.spec.key or self.name)

    def status(self) -> dict:
        return {"every": self.spec.every}
