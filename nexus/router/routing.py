"""Which groups an event goes to, and which partition within each group."""

from __future__ import annotations

import fnmatch
import zlib
from dataclasses import dataclass


def key_hash(key: str) -> int:
    """Stable across processes and Python versions (unlike hash())."""
    return zlib.crc32(key.encode("utf-8", "surrogatepass"))


def partition_of(khash: int, partitions: int) -> int:
    return khash % partitions


def matches(type_: str, patterns: list[str] | tuple[str, ...]) -> bool:
    return any(fnmatch.fnmatchcase(type_, p) for p in patterns)


@dataclass(frozen=True)
class Route:
    group: str
    partitions: int


class RouteTable:
    """Caches, per event type, the groups whose subscriptions match it."""

    def __init__(self, groups: dict[str, tuple[list[str], int]]):
        self.groups = {name: (tuple(patterns), partitions) for name, (patterns, partitions) in groups.items()}
        self._cache: dict[str, tuple[Route, ...]] = {}

    def routes(self, type_: str) -> tuple[Route, ...]:
        found = self._cache.get(type_)
        if found is None:
            found = tuple(
                Route(name, parts) for name, (patterns, parts) in self.groups.items() if matches(type_, patterns)
            )
            if len(self._cache) < 100_000:
                self._cache[type_] = found
        return found

    def route_of(self, group: str) -> Route | None:
        spec = self.groups.get(group)
        return Route(group, spec[1]) if spec else None
