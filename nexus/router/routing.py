"""Which groups an event goes to (the partition within each: nexus/protocol/partitions.py)."""

from __future__ import annotations

import fnmatch
from dataclasses import dataclass


def matches(type_: str, patterns: list[str] | tuple[str, ...]) -> bool:
    return any(fnmatch.fnmatchcase(type_, p) for p in patterns)


@dataclass(frozen=True)
class Route:
    group: str
    partitions: int


class RouteTable:
    """Caches, per event type, the groups whose subscriptions match it."""

    def __init__(self, groups: dict[str, tuple[list[str], int]]):
        self.groups: dict[str, tuple[tuple[str, ...], int]] = {}
        self._cache: dict[str, tuple[Route, ...]] = {}
        self.replace(groups)

    def replace(self, groups: dict[str, tuple[list[str], int]]) -> None:
        """New groups or subscriptions (a reload): in place, so holders of `routes` see them."""
        self.groups = {name: (tuple(patterns), partitions) for name, (patterns, partitions) in groups.items()}
        self._cache = {}

    def routes(self, type_: str) -> tuple[Route, ...]:
        found = self._cache.get(type_)
        if found is None:
            found = tuple(
                Route(name, parts) for name, (patterns, parts) in self.groups.items() if matches(type_, patterns)
            )
            if len(self._cache) < 100_000:
                self._cache[type_] = found
        return found
