"""A member's I/O on the group bucket: the group's start, the owner
records (read, compare-and-set), and a watch that keeps the roster and owners current.

Liveness is judged by the reader's own monotonic clock: a member whose record did not
change for `dead_after` seconds since we last saw it change is suspect (no clocks compared
across hosts); a suspect's record is read once more before it is called dead, since our
own loop may have been the one that stood still (a long sync handler call) with its
updates waiting unread."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterable
from typing import Any

import msgspec
from nats.js import JetStreamContext
from nats.js.errors import KeyNotFoundError, KeyWrongLastSequenceError
from nats.js.kv import KV_DEL, KV_PURGE, KeyValue

from nexus.jetstream import records
from nexus.jetstream.names import Names
from nexus.jetstream.records import GroupRecord, OwnerRecord


class Roster:
    """Members seen in the bucket and when (our clock) their record last changed."""

    def __init__(self, dead_after: float):
        self.dead_after = dead_after
        self.changed: dict[str, float] = {}  # member -> when we saw its record change
        self.revision: dict[str, int] = {}  # member -> the revision we saw last
        self.dead: set[str] = set()  # suspects read again unchanged (not read again until they beat)

    def seen(self, member: str, now: float, revision: int = 0) -> None:
        if revision <= self.revision.get(member, -1):
            return  # not a change
        self.changed[member] = now
        self.revision[member] = revision
        self.dead.discard(member)

    def renewed(self, member: str, now: float, revision: int) -> None:
        """Read directly at a newer revision than a suspect had: alive now (whether or not
        the watch recorded that revision meanwhile)."""
        self.seen(member, now, revision)
        self.changed[member] = now

    def confirmed_dead(self, member: str) -> None:
        self.dead.add(member)

    def gone(self, member: str) -> None:
        self.changed.pop(member, None)
        self.revision.pop(member, None)
        self.dead.discard(member)

    def suspects(self, now: float) -> list[str]:
        return [m for m, t in self.changed.items() if now - t > self.dead_after and m not in self.dead]

    def alive(self, now: float) -> set[str]:
        return {m for m, t in self.changed.items() if now - t <= self.dead_after}


class Leases:
    def __init__(self, js: JetStreamContext, kv: KeyValue, names: Names, group: str, member: str, roster: Roster):
        self.js, self.kv, self.names = js, kv, names
        self.group, self.member = group, member
        self.roster = roster
        self.owners: dict[int, tuple[int, OwnerRecord]] = {}  # partition -> (revision, record), watched
        self.owner_changed = asyncio.Event()  # an owner record changed (a loss may be due)
        self._watchers: dict[str, Any] = {}  # pattern -> its watcher

    # -- the group ---------------------------------------------------------------------------
    async def group_start(self, start: str) -> int:
        """The group's first seq: created once by the first member (losing the race: read it)."""
        key = Names.group_key(self.group)
        try:
            entry = await self.kv.get(key)
            assert entry.value is not None
            return records.group_decoder.decode(entry.value).start_seq
        except KeyNotFoundError:
            pass
        state = (await self.js.stream_info(self.names.stream)).state
        seq = max(state.first_seq, 1) if start == "earliest" else state.last_seq + 1
        try:
            await self.kv.create(key, records.encoder.encode(GroupRecord(start_seq=seq, created=time.time())))
            return seq
        except KeyWrongLastSequenceError:
            entry = await self.kv.get(key)
            assert entry.value is not None
            return records.group_decoder.decode(entry.value).start_seq

    # -- liveness --------------------------------------------------------------------------------
    async def alive(self, owners: Iterable[str] = ()) -> set[str]:
        """The live members: the roster's, after reading each suspect's record again.

        `owners` (members named by owner records) that the roster has not seen yet are read
        too: the watch may bring an owner record before its member's first beat (a member
        that just started and took partitions). Calling such an owner dead would take its
        partitions while it handles them (unflagged duplicates); it is dead only once its
        record is gone or seen stale like any other."""
        for member in set(owners) - self.roster.changed.keys() - self.roster.dead - {""}:
            try:
                entry = await self.kv.get(Names.member_key(self.group, member))
            except KeyNotFoundError:
                self.roster.confirmed_dead(member)  # (left, its record deleted: a beat would bring it back)
                continue
            self.roster.seen(member, time.monotonic(), entry.revision or 0)
        for member in self.roster.suspects(time.monotonic()):
            before = self.roster.revision.get(member, -1)  # (the watch may record newer ones meanwhile)
            try:
                entry = await self.kv.get(Names.member_key(self.group, member))
            except KeyNotFoundError:
                self.roster.gone(member)
                continue
            if (entry.revision or 0) > before:
                self.roster.renewed(member, time.monotonic(), entry.revision or 0)
            else:
                self.roster.confirmed_dead(member)
        return self.roster.alive(time.monotonic())

    # -- owner records ---------------------------------------------------------------------------
    async def owner(self, partition: int) -> tuple[int, OwnerRecord | None]:
        """(revision, record) of `partition`'s owner record; (0, None) when there is none."""
        try:
            entry = await self.kv.get(Names.owner_key(self.group, partition))
        except KeyNotFoundError:
            return 0, None
        assert entry.value is not None and entry.revision is not None
        return entry.revision, records.owner_decoder.decode(entry.value)

    async def swap(self, partition: int, record: OwnerRecord, last: int) -> int | None:
        """Compare-and-set: the new revision, or None when the record changed meanwhile."""
        key, value = Names.owner_key(self.group, partition), records.encoder.encode(record)
        try:
            if last == 0:
                return await self.kv.create(key, value)
            return await self.kv.update(key, value, last=last)
        except KeyWrongLastSequenceError:
            return None

    # -- the watch -------------------------------------------------------------------------------
    async def watch(self) -> None:
        """Follow the group's member and owner records (the initial values first)."""
        for pattern, on in ((f"m.{self.group}.*", self._on_member), (f"o.{self.group}.*", self._on_owner)):
            if pattern in self._watchers:
                continue  # (made before a retry)
            watcher = await self.kv.watch(pattern)
            self._watchers[pattern] = watcher
            asyncio.ensure_future(self._follow(watcher, on))

    async def _follow(self, watcher: Any, on: Any) -> None:
        async for entry in watcher:
            if entry is not None:
                on(entry)

    def _on_member(self, entry: Any) -> None:
        member = entry.key.split(".", 2)[2]
        if entry.operation in (KV_DEL, KV_PURGE):
            self.roster.gone(member)
        else:
            self.roster.seen(member, time.monotonic(), entry.revision or 0)

    def _on_owner(self, entry: Any) -> None:
        try:
            partition = int(entry.key.rsplit(".", 1)[1])
            record = records.owner_decoder.decode(entry.value) if entry.value else OwnerRecord()
        except (ValueError, msgspec.DecodeError, msgspec.ValidationError):
            return
        self.owners[partition] = (entry.revision, record)
        self.owner_changed.set()

    async def stop(self) -> None:
        for watcher in self._watchers.values():
            try:
                await watcher.stop()
            except Exception:  # (the connection may be gone already)
                pass
