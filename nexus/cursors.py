"""Durable group cursors: one small msgpack file, replaced atomically."""
from __future__ import annotations

import os

import msgspec
import structlog

log = structlog.get_logger("nexus.cursors")


class CursorStore:
    def __init__(self, path: str):
        self.path = path
        self._last: dict[str, list[int]] | None = None

    def load(self) -> dict[str, list[int]]:
        try:
            with open(self.path, "rb") as f:
                data = msgspec.msgpack.decode(f.read(), type=dict[str, list[int]])
        except FileNotFoundError:
            return {}
        except (msgspec.DecodeError, msgspec.ValidationError) as exc:
            log.error("cursor_file_unreadable", path=self.path, error=str(exc))
            return {}
        self._last = {k: list(v) for k, v in data.items()}
        return data

    def changed(self, snapshot: dict[str, list[int]]) -> bool:
        return snapshot != self._last

    def save(self, snapshot: dict[str, list[int]]) -> None:
        tmp = f"{self.path}.tmp"
        os.makedirs(os.path.dirname(self.path), exist_ok=True)
        with open(tmp, "wb") as f:
            f.write(msgspec.msgpack.encode(snapshot))
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, self.path)
        self._last = {k: list(v) for k, v in snapshot.items()}
