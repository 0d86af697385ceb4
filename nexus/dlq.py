"""The dead-letter store: events that exhausted their retries, in SQLite.

Only the router writes it (members send `DeadLetter` over coord before they ack),
so there is one writer and a member on another host needs no shared disk. Rows are
keyed by (group, event id): a replayed event that fails again updates its row.
"""
from __future__ import annotations

import os
import sqlite3
import time
from typing import Any

SCHEMA = """
CREATE TABLE IF NOT EXISTS dead_letters (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    grp TEXT NOT NULL,
    event_id TEXT NOT NULL,
    type TEXT NOT NULL,
    source TEXT NOT NULL,
    seq INTEGER NOT NULL,
    partition INTEGER NOT NULL,
    member TEXT NOT NULL,
    error_type TEXT NOT NULL,
    error TEXT NOT NULL,
    traceback TEXT NOT NULL,
    attempts INTEGER NOT NULL,
    first_failed REAL NOT NULL,
    last_failed REAL NOT NULL,
    failures INTEGER NOT NULL DEFAULT 1,
    status TEXT NOT NULL DEFAULT 'dead',
    replayed_at REAL,
    event BLOB NOT NULL,
    UNIQUE (grp, event_id)
);
CREATE INDEX IF NOT EXISTS dead_letters_status ON dead_letters (status, grp, type);
"""
COLUMNS = ("id", "grp", "event_id", "type", "source", "seq", "partition", "member", "error_type",
           "error", "traceback", "attempts", "first_failed", "last_failed", "failures", "status",
           "replayed_at")


class DeadLetterStore:
    def __init__(self, path: str):
        self.path = path
        os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
        self.db = sqlite3.connect(path, isolation_level=None, timeout=10)
        self.db.execute("PRAGMA journal_mode=WAL")
        self.db.execute("PRAGMA synchronous=FULL")     # rare writes; each one must survive
        self.db.executescript(SCHEMA)

    def put(self, *, group: str, event_id: str, type: str, source: str, seq: int, partition: int,
            member: str, error_type: str, error: str, traceback: str, attempts: int,
            first_failed: float, event: bytes) -> int:
        now = time.time()
        self.db.execute(
            """INSERT INTO dead_letters (grp, event_id, type, source, seq, partition, member, error_type,
                   error, traceback, attempts, first_failed, last_failed, event)
               VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)
               ON CONFLICT (grp, event_id) DO UPDATE SET
                   seq=excluded.seq, partition=excluded.partition, member=excluded.member,
                   error_type=excluded.error_type, error=excluded.error, traceback=excluded.traceback,
                   attempts=dead_letters.attempts + excluded.attempts, last_failed=excluded.last_failed,
                   failures=dead_letters.failures + 1, status='dead'""",
            (group, event_id, type, source, seq, partition, member, error_type, error[:4000],
             traceback[:8000], attempts, first_failed, now, event))
        row = self.db.execute("SELECT id FROM dead_letters WHERE grp=? AND event_id=?", (group, event_id)).fetchone()
        return int(row[0])

    def list(self, group: str | None = None, type: str | None = None, status: str | None = "dead",
             limit: int = 1000) -> list[dict[str, Any]]:
        where, args = [], []
        for column, value in (("grp", group), ("type", type), ("status", status)):
            if value is not None:
                where.append(f"{column} = ?")
                args.append(value)
        sql = f"SELECT {', '.join(COLUMNS)} FROM dead_letters"
        if where:
            sql += " WHERE " + " AND ".join(where)
        sql += " ORDER BY id LIMIT ?"
        return [self._row(r) for r in self.db.execute(sql, (*args, limit))]

    def get(self, row_id: int) -> tuple[dict[str, Any], bytes] | None:
        r = self.db.execute(f"SELECT {', '.join(COLUMNS)}, event FROM dead_letters WHERE id = ?",
                            (row_id,)).fetchone()
        return None if r is None else (self._row(r[:-1]), bytes(r[-1]))

    def mark_replayed(self, row_ids: list[int]) -> None:
        now = time.time()
        self.db.executemany("UPDATE dead_letters SET status='replayed', replayed_at=? WHERE id=?",
                            [(now, i) for i in row_ids])

    def purge(self, group: str | None = None, row_ids: list[int] | None = None) -> int:
        if row_ids:
            cur = self.db.executemany("DELETE FROM dead_letters WHERE id = ?", [(i,) for i in row_ids])
        elif group is not None:
            cur = self.db.execute("DELETE FROM dead_letters WHERE grp = ?", (group,))
        else:
            cur = self.db.execute("DELETE FROM dead_letters")
        return cur.rowcount

    def counts(self) -> dict[str, int]:
        return dict(self.db.execute(
            "SELECT grp, COUNT(*) FROM dead_letters WHERE status='dead' GROUP BY grp").fetchall())

    def close(self) -> None:
        self.db.close()

    @staticmethod
    def _row(r) -> dict[str, Any]:
        row = dict(zip(COLUMNS, r))
        row["group"] = row.pop("grp")
        return row
