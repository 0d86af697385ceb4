"""Durable group cursors: one small msgpack file, replaced atomically."""
from __future__ import annotations

import os

import msgspec
import structlog

log = structlog.get_logger("nexus.cursors")


class CursorStore:
    def __init__(self, path: str):
        self.path = path

    def load(self) -> dict[str, list[int]]:
        try:
            with open(self.path, "rb") as f:
                data = msgspec.msgpack.decode(f.read(), type=dict[str, list[int]])
        except FileNotFoundError:
            return {}
        except (msgspec.DecodeError, msgspec.ValidationError) as exc:
            log.error("cursor_file_unreadable", path=self.path, error=str(exc))
            return {}
        return data

    def save(self, snapshot: dict[str, list[int]]) -> None:
        tmp = f"{self.path}.tmp"
        os.makedirs(os.path.dirname(self.path), exist_ok=True)
        with open(tmp, "wb") as f:
            f.write(msgspec.msgpack.encode(snapshot))
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, self.path)
