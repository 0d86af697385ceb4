"""The black box: a small shared-memory file per supervised child, written by the
child and read by the launcher, so a hang or a crash can be explained afterwards.

The child stamps `beat` on every turn of its main loop and records the events its
handlers are running (one slot per concurrent handler call) before it starts them.
When the child dies, the slots still name what it was handling; when it stops
beating, the launcher knows it hangs even though the process is alive.

Layout (native byte order, fixed size, 8-byte aligned so each field is written
atomically on the platforms we run on):

    u64[0]  magic
    u64[1]  pid of the writer
    f64[2]  beat: time.monotonic() of the last loop turn (CLOCK_MONOTONIC: one clock
            for every process of the machine)
    u64[3]  number of slots
    u64[4 + 2*i]      seq of the event slot i is handling (0: free)
    u64[4 + 2*i + 1]  partition of that event

Writing costs two stores into a memoryview per handler call, nothing more.
"""

from __future__ import annotations

import mmap
import os
import struct
import time
from dataclasses import dataclass

from nexus.common import private

MAGIC = 0x4E58424F58000001  # "NXBOX" v1
HEADER_WORDS = 4
DEFAULT_SLOTS = 64
MAX_SLOTS = 1 << 16  # the launcher sizes a member's box to its group's concurrency
SLOT0_SEQ, SLOT0_PARTITION = HEADER_WORDS, HEADER_WORDS + 1  # `words` indexes of slot 0 (mark/unmark)


_current: BlackBox | None = None


def path_for(data_dir: str, name: str) -> str:
    """Where the launcher keeps child `name`'s box."""
    return os.path.join(data_dir, "run", "box", f"{name}.box")


def reason_path(data_dir: str, name: str) -> str:
    """Next to the box: the one line a child that gives up (a config error) leaves for
    the launcher's log and the LAST EXIT column of `nexus status`."""
    return os.path.join(data_dir, "run", "box", f"{name}.reason")


def leave_reason(data_dir: str, name: str, text: str) -> bool:
    try:
        with os.fdopen(private.create(reason_path(data_dir, name)), "w") as f:
            f.write(text)
        return True
    except OSError:
        return False


def take_reason(data_dir: str, name: str) -> str:
    """The line child `name` left (removed once read), or ''."""
    path = reason_path(data_dir, name)
    try:
        with open(path) as f:
            text = f.read().strip()
        os.unlink(path)
        return text
    except OSError:
        return ""


def install(box: BlackBox | None) -> None:
    """The child's own box (set once at start by nexus/supervisor/child.py)."""
    global _current
    _current = box


def current() -> BlackBox | None:
    """This process's box, or None when it runs without a launcher (`nexus worker`,
    a router in a test thread): then there is nothing to write."""
    return _current


@dataclass(frozen=True)
class InFlight:
    slot: int
    partition: int
    seq: int


def _size(slots: int) -> int:
    return 8 * (HEADER_WORDS + 2 * slots)


class BlackBox:
    """One child's box. `create` (launcher) makes the file; `open` (child) maps it."""

    def __init__(self, path: str, fd: int, slots: int):
        self.path = path
        self._map = mmap.mmap(fd, _size(slots))
        os.close(fd)
        self._u64 = memoryview(self._map).cast("Q")
        self.words = self._u64  # for the dispatcher's inlined mark/unmark (hot path)
        self._f64 = memoryview(self._map).cast("d")
        self.slots = slots
        self._free = list(range(slots - 1, -1, -1))  # a stack: slot 0 first

    # -- both sides ------------------------------------------------------------
    @classmethod
    def create(cls, path: str, slots: int = DEFAULT_SLOTS) -> BlackBox:
        """Make (or reset) the file, private to its owner, with every slot free."""
        private.makedirs(os.path.dirname(path))
        fd = private.create(path, os.O_RDWR | os.O_CREAT | os.O_TRUNC)
        os.ftruncate(fd, _size(slots))
        box = cls(path, fd, slots)
        box._u64[0] = MAGIC
        box._u64[3] = slots
        return box

    @classmethod
    def open(cls, path: str) -> BlackBox:
        fd = os.open(path, os.O_RDWR)
        try:
            head = os.pread(fd, 8 * HEADER_WORDS, 0)
            magic, _pid, _beat, slots = struct.unpack("QQdQ", head)
        except (OSError, struct.error):
            os.close(fd)
            raise ValueError(f"{path}: not a black box file") from None
        if magic != MAGIC or not 0 < slots <= MAX_SLOTS:
            os.close(fd)
            raise ValueError(f"{path}: not a black box file")
        return cls(path, fd, int(slots))

    def close(self) -> None:
        self._u64.release()
        self._f64.release()
        self._map.close()

    # -- the child writes --------------------------------------------------------
    def started(self) -> None:
        """The child is up: note its pid and a first beat."""
        self._u64[1] = os.getpid()
        self.beat()

    def beat(self, now: float | None = None) -> None:
        self._f64[2] = time.monotonic() if now is None else now

    def begin(self, partition: int, seq: int) -> int:
        """Record an event a handler is about to run; returns its slot for `end`
        (call `end` exactly once per `begin`)."""
        slot = self._free.pop() if self._free else self.slots - 1  # never fails: reuse the last
        self._u64[HEADER_WORDS + 2 * slot + 1] = partition
        self._u64[HEADER_WORDS + 2 * slot] = seq
        return slot

    def end(self, slot: int) -> None:
        self._u64[HEADER_WORDS + 2 * slot] = 0
        self._free.append(slot)

    # one handler call at a time (sync handlers): slot 0, no bookkeeping
    # (Dispatch._run_stream inlines these as stores into `words`)
    def mark(self, partition: int, seq: int) -> None:
        self._u64[SLOT0_PARTITION] = partition
        self._u64[SLOT0_SEQ] = seq

    def unmark(self) -> None:
        self._u64[SLOT0_SEQ] = 0

    # -- the launcher reads --------------------------------------------------------
    def last_beat(self) -> float:
        """monotonic() of the child's last beat; 0.0 if it never beat."""
        return self._f64[2]

    def pid(self) -> int:
        return int(self._u64[1])

    def inflight(self) -> list[InFlight]:
        out = []
        for slot in range(self.slots):
            seq = self._u64[HEADER_WORDS + 2 * slot]
            if seq:
                out.append(InFlight(slot, int(self._u64[HEADER_WORDS + 2 * slot + 1]), int(seq)))
        return out

    def reset(self) -> None:
        """Before a restart: forget the dead child's beat and slots."""
        self._u64[1] = 0
        self._f64[2] = 0.0
        for slot in range(self.slots):
            self._u64[HEADER_WORDS + 2 * slot] = 0
