"""Durable group cursors: one small checksummed msgpack file (nexus/common/statefile.py)."""

from __future__ import annotations

import msgspec

from nexus.common import statefile

_decoder = msgspec.msgpack.Decoder(dict[str, list[int]])


class CursorStore:
    def __init__(self, path: str):
        self.path = path
        # set when load() found the file damaged: {"path", "error", "recovered_from"};
        # shown by `nexus status`. Groups without a recovered cursor then start at the
        # journal start, never at `start: latest` (that would skip their backlog).
        self.damage: dict | None = None

    @property
    def lost(self) -> bool:
        return self.damage is not None

    def load(self, quarantine: bool = True) -> dict[str, list[int]]:
        """quarantine=False: read only (for anyone but the router, which owns the file)."""
        loaded = statefile.read(self.path, _decoder.decode, quarantine)
        if loaded.damaged:
            self.damage = {"path": self.path, "error": loaded.damaged, "recovered_from": loaded.recovered_from}
        return loaded.value or {}

    def save(self, snapshot: dict[str, list[int]]) -> None:
        statefile.write(self.path, msgspec.msgpack.encode(snapshot))
