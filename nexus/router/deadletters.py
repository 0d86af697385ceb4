"""The dead-letter store: events that exhausted their retries, in SQLite.

Only the router writes it (members send `DeadLetter` over coord and ack the event only
once the router confirms it stored it), so a member on another host needs no shared
disk. Dead letters are written by one thread (`DeadLetterWriter`) with its own
connection: SQLite waits (a busy database, an fsync) never stall the router loop, and
a busy database is retried until the write succeeds, never dropped. Rows are keyed by
(group, event id): a member's resend of the same dead letter (same seq) changes nothing;
a replayed event (a new seq) that fails again updates its row.
"""

from __future__ import annotations

import builtins
import collections
import os
import queue
import sqlite3
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import structlog

from nexus.common import private

log = structlog.get_logger("nexus.dlq")

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
COLUMNS = (
    "id",
    "grp",
    "event_id",
    "type",
    "source",
    "seq",
    "partition",
    "member",
    "error_type",
    "error",
    "traceback",
    "attempts",
    "first_failed",
    "last_failed",
    "failures",
    "status",
    "replayed_at",
)


POISON_TYPES = ("ProcessCrashed", "HandlerTimeout")  # dead-lettered by the router for a launcher


class DeadLetterStore:
    def __init__(self, path: str, timeout: float = 0.5):
        # `timeout`: how long a statement waits for a lock. Short: the router loop's own
        # connection (reads, operator purges) must never stall the loop for long.
        self.path = path
        private.makedirs(os.path.dirname(path) or ".")
        # made 0600 before SQLite opens it: SQLite gives the -wal and -shm files the
        # database file's own mode
        os.close(private.create(path, os.O_RDWR | os.O_CREAT))
        self.db = sqlite3.connect(path, isolation_level=None, timeout=timeout, check_same_thread=False)
        self.db.execute("PRAGMA journal_mode=WAL")
        self.db.execute("PRAGMA synchronous=FULL")  # rare writes; each one must survive
        self.db.executescript(SCHEMA)

    def put(
        self,
        *,
        group: str,
        event_id: str,
        type: str,
        source: str,
        seq: int,
        partition: int,
        member: str,
        error_type: str,
        error: str,
        traceback: str,
        attempts: int,
        first_failed: float,
        event: bytes,
    ) -> int:
        now = time.time()
        self.db.execute(
            """INSERT INTO dead_letters (grp, event_id, type, source, seq, partition, member, error_type,
                   error, traceback, attempts, first_failed, last_failed, event)
               VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)
               ON CONFLICT (grp, event_id) DO UPDATE SET
                   seq=excluded.seq, partition=excluded.partition, member=excluded.member,
                   error_type=excluded.error_type, error=excluded.error, traceback=excluded.traceback,
                   attempts=dead_letters.attempts + excluded.attempts, last_failed=excluded.last_failed,
                   failures=dead_letters.failures + 1, status='dead'
               WHERE NOT (dead_letters.seq = excluded.seq AND dead_letters.status = 'dead')""",
            (
                group,
                event_id,
                type,
                source,
                seq,
                partition,
                member,
                error_type,
                error[:4000],
                traceback[:8000],
                attempts,
                first_failed,
                now,
                event,
            ),
        )
        row = self.db.execute("SELECT id FROM dead_letters WHERE grp=? AND event_id=?", (group, event_id)).fetchone()
        return int(row[0])

    def list(
        self,
        group: str | None = None,
        type: str | None = None,
        status: str | None = "dead",
        limit: int | None = 1000,
        after: int = 0,
    ) -> list[dict[str, Any]]:
        """Rows with id > `after`, oldest first; at most `limit` (None: all of them)."""
        where, args = self._where(group, type, status, after)
        sql = f"SELECT {', '.join(COLUMNS)} FROM dead_letters{where} ORDER BY id"
        if limit is not None:
            sql += " LIMIT ?"
            args.append(limit)
        return [self._row(r) for r in self.db.execute(sql, args)]

    def count(
        self, group: str | None = None, type: str | None = None, status: str | None = "dead", after: int = 0
    ) -> int:
        """How many rows `list` would give without a limit."""
        where, args = self._where(group, type, status, after)
        return int(self.db.execute(f"SELECT COUNT(*) FROM dead_letters{where}", args).fetchone()[0])

    @staticmethod
    def _where(group: str | None, type: str | None, status: str | None, after: int) -> tuple[str, builtins.list]:
        where = ["id > ?"]
        args: builtins.list[Any] = [after]
        for column, value in (("grp", group), ("type", type), ("status", status)):
            if value is not None:
                where.append(f"{column} = ?")
                args.append(value)
        return " WHERE " + " AND ".join(where), args

    def get(self, row_id: int) -> tuple[dict[str, Any], bytes] | None:
        r = self.db.execute(f"SELECT {', '.join(COLUMNS)}, event FROM dead_letters WHERE id = ?", (row_id,)).fetchone()
        return None if r is None else (self._row(r[:-1]), bytes(r[-1]))

    # (below `list`, the method, shadows the builtin in this class: hence builtins.list)
    def mark_replayed(self, row_ids: Sequence[int]) -> None:
        now = time.time()
        self.db.executemany(
            "UPDATE dead_letters SET status='replayed', replayed_at=? WHERE id=?", [(now, i) for i in row_ids]
        )

    def purge(self, group: str | None = None, row_ids: Sequence[int] | None = None) -> int:
        if row_ids:
            cur = self.db.executemany("DELETE FROM dead_letters WHERE id = ?", [(i,) for i in row_ids])
        elif group is not None:
            cur = self.db.execute("DELETE FROM dead_letters WHERE grp = ?", (group,))
        else:
            cur = self.db.execute("DELETE FROM dead_letters")
        return cur.rowcount

    def poison(self) -> builtins.list[tuple[str, int, int]]:
        """(group, partition, seq) of events dead-lettered for killing or hanging members:
        their group's next owner passes over them (rebuilt into Assign.skip on start)."""
        return self.db.execute(
            f"SELECT grp, partition, seq FROM dead_letters WHERE status='dead' AND error_type IN "
            f"({', '.join('?' * len(POISON_TYPES))})",
            POISON_TYPES,
        ).fetchall()

    def counts(self) -> dict[str, int]:
        return dict(
            self.db.execute("SELECT grp, COUNT(*) FROM dead_letters WHERE status='dead' GROUP BY grp").fetchall()
        )

    def close(self) -> None:
        self.db.close()

    @staticmethod
    def _row(r) -> dict[str, Any]:
        row = dict(zip(COLUMNS, r, strict=False))
        row["group"] = row.pop("grp")
        return row


BUSY_BACKOFF = (0.05, 0.1, 0.2, 0.5, 1.0)


@dataclass
class PendingDeadLetter:
    fields: dict  # DeadLetterStore.put keywords
    reply_to: bytes | None = None  # the member's coord identity (None: the router's own)
    tag: Any = None  # handed back with the result
    row: int = 0
    error: str = ""
    attempts: int = field(default=0)
    replayed: list[int] = field(default_factory=list)  # instead of a put: mark these rows replayed


class DeadLetterWriter:
    """The one writer of dead letters: a thread with its own connection. `submit` from
    the router loop; finished ones show up in `done` (a deque the loop drains)."""

    def __init__(self, path: str):
        self.path = path
        self.done: collections.deque[PendingDeadLetter] = collections.deque()
        self.busy_waits = 0  # lock waits (for status)
        self.errors = 0  # writes that failed for good (for status)
        self.last_error = ""
        self._in: queue.SimpleQueue[PendingDeadLetter | None] = queue.SimpleQueue()
        self._stopping = threading.Event()
        self.store = DeadLetterStore(path, timeout=0.1)  # schema made here, before any reader
        self._thread = threading.Thread(target=self._run, name="nexus-dlq-writer", daemon=True)

    def start(self) -> DeadLetterWriter:
        self._thread.start()
        return self

    def submit(self, item: PendingDeadLetter) -> None:
        self._in.put(item)

    def stop(self, timeout: float = 2.0) -> None:
        """Write what is queued (a busy database gets until `timeout`), then stop. What is
        left unwritten was not confirmed: its members send it again to the next router."""
        self._in.put(None)
        self._thread.join(timeout)
        self._stopping.set()
        self._thread.join(5)
        self.store.close()

    def alive(self) -> bool:
        return self._thread.is_alive()

    def describe(self) -> dict:
        return {
            "alive": self.alive(),
            "queued": self._in.qsize(),
            "busy_waits": self.busy_waits,
            "errors": self.errors,
            "last_error": self.last_error,
        }

    def _run(self) -> None:
        while True:
            item = self._in.get()
            if item is None:
                return
            try:
                self._write(item)
            except Exception as exc:  # never die: members would wait for DeadLetterStored forever
                item.error = f"{type(exc).__name__}: {exc}"
                log.error(
                    "dead_letter_store_failed",
                    error=item.error,
                    group=item.fields.get("group"),
                    seq=item.fields.get("seq"),
                )
            if item.error:
                self.errors += 1
                self.last_error = item.error
            self.done.append(item)

    def _write(self, item: PendingDeadLetter) -> None:
        waits = 0
        while True:
            item.attempts += 1
            try:
                if item.replayed:
                    self.store.mark_replayed(item.replayed)
                else:
                    item.row = self.store.put(**item.fields)
                item.error = ""
                if waits:
                    log.info("dead_letter_store_free", waited_attempts=waits)
                return
            except sqlite3.Error as exc:
                item.error = str(exc)
                operational = isinstance(exc, sqlite3.OperationalError)
                busy = operational and ("locked" in item.error or "busy" in item.error)
                # a write the database refuses for good (integrity, corrupt file) is not retried
                if self._stopping.is_set() or (not busy and (item.reply_to is not None or not operational)):
                    # not a lock (disk full, I/O error): not confirmed, so the member keeps
                    # the event and sends it again; never acked without a stored row. The
                    # router's own (poison) dead letters have no one to resend: retried here
                    log.error(
                        "dead_letter_store_failed",
                        error=item.error,
                        group=item.fields.get("group"),
                        seq=item.fields.get("seq"),
                    )
                    return
                if waits == 0:
                    log.warning("dead_letter_store_busy", error=item.error, action="retrying")
                self.busy_waits += 1
                time.sleep(BUSY_BACKOFF[min(waits, len(BUSY_BACKOFF) - 1)])
                waits += 1
