"""Small state files (group cursors, IMAP positions): atomic, checksummed, and with the
previous good copy kept, so damage is seen and never read as "no state".

File: MAGIC (5 bytes) | crc32 of the body (u32 BE) | body length (u32 BE) | body.
A write goes to NAME.tmp (fsync), the current file is hard-linked to NAME.prev, NAME.tmp
is renamed over NAME and the directory is fsynced: at every instant NAME is a complete
file, and NAME.prev the one before it.

A read checks the header and checksum. A damaged NAME is moved aside to NAME.damaged
(kept for inspection, and so the next write does not make it the previous copy) and
NAME.prev is read instead; `state_file_damaged` is logged once either way. Files
without the header (written before this module) are read as the bare body: the
caller's parser decides whether they are intact.
"""

from __future__ import annotations

import os
import struct
import zlib
from collections.abc import Callable
from typing import Generic, NamedTuple, TypeVar

import structlog

from nexus.common import private

log = structlog.get_logger("nexus.statefile")

MAGIC = b"NXSF\x01"
_HEADER = struct.Struct(">5sII")
T = TypeVar("T")


class Loaded(NamedTuple, Generic[T]):
    value: T | None  # None: nothing usable (missing, or damaged with no good copy)
    damaged: str  # "" when fine, else what was wrong with NAME
    recovered_from: str  # "" | "previous" (NAME.prev) | "nothing"


class Damaged(ValueError):
    pass


def encode(body: bytes) -> bytes:
    return _HEADER.pack(MAGIC, zlib.crc32(body), len(body)) + body


def decode(data: bytes) -> bytes:
    """The body of a state file; raise Damaged when it is not intact. Data without the
    header is an old-format file: returned as it is."""
    if not data.startswith(MAGIC[:4]):
        return data
    if len(data) < _HEADER.size:
        raise Damaged(f"truncated header ({len(data)} bytes)")
    magic, crc, length = _HEADER.unpack_from(data)
    if magic != MAGIC:
        raise Damaged(f"unknown format {magic!r}")
    body = data[_HEADER.size :]
    if len(body) != length:
        raise Damaged(f"body is {len(body)} bytes, header says {length}")
    if zlib.crc32(body) != crc:
        raise Damaged("checksum mismatch")
    return body


def write(path: str, body: bytes) -> None:
    """Replace the file at `path` atomically and durably, keeping the old one as .prev."""
    directory = os.path.dirname(path) or "."
    private.makedirs(directory)
    tmp = f"{path}.tmp"
    try:
        with os.fdopen(private.create(tmp), "wb") as f:  # 0600: the state is the owner's alone
            f.write(encode(body))
            f.flush()
            os.fsync(f.fileno())
    except BaseException:
        unlink_quietly(tmp)  # e.g. ENOSPC: leave no half file behind
        raise
    try:
        prev_tmp = f"{path}.prev.tmp"
        unlink_quietly(prev_tmp)
        os.link(path, prev_tmp)  # no copy: the current inode becomes .prev
        os.replace(prev_tmp, f"{path}.prev")
    except OSError:
        pass  # the first write (no file yet), or no hard links here
    os.replace(tmp, path)
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)  # the renames themselves are durable
    finally:
        os.close(fd)


def unlink_quietly(path: str) -> None:
    """Remove a file if it can be (best effort: cleanup of temp files, boxes, stale sockets)."""
    try:
        os.unlink(path)
    except OSError:
        pass


def read(path: str, parse: Callable[[bytes], T], quarantine: bool = True) -> Loaded[T]:
    """Read and parse the state at `path` (parse raises on invalid content); fall back
    to the previous copy when it is damaged or gone while a previous copy exists.
    quarantine=False (a reader that does not own the file, e.g. `nexus journal verify`
    beside a live router): change nothing, log nothing; the caller reports `damaged`."""
    problem = ""
    try:
        with open(path, "rb") as f:
            return Loaded(parse(decode(f.read())), "", "")
    except FileNotFoundError:
        if not os.path.exists(f"{path}.prev"):
            return Loaded(None, "", "")  # never written: no state, nothing damaged
        problem = "file is missing but its previous copy exists"
    except Exception as exc:  # Damaged, or the parser's own error
        problem = f"{type(exc).__name__}: {exc}"
        if quarantine:
            try:
                os.replace(path, f"{path}.damaged")
            except OSError:
                pass
    value: T | None = None
    try:
        with open(f"{path}.prev", "rb") as f:
            value = parse(decode(f.read()))
    except Exception:
        value = None
    recovered = "previous" if value is not None else "nothing"
    if not quarantine:
        return Loaded(value, problem, recovered)
    log.error(
        "state_file_damaged",
        path=path,
        error=problem,
        recovered_from=recovered,
        kept=f"{path}.damaged" if os.path.exists(f"{path}.damaged") else None,
    )
    return Loaded(value, problem, recovered)
