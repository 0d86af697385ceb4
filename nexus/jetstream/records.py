"""The values in the pipeline's KV bucket (`{stream}_groups`), msgpack-encoded. Written by
members (nexus/jsmember/), read by them and by the status, metrics and replay side
(nexus/jetstream/ops.py). Every change to an owner record is a compare-and-set on its
revision: the bucket's revision is what makes a partition's ownership exclusive.

    m.{group}.{member}   MemberRecord   a live member; rewritten every heartbeat interval,
                                        deleted when it leaves
    o.{group}.{p}        OwnerRecord    who owns partition p of the group, and from where
                                        its next consumer starts
    g.{group}            GroupRecord    where the group started (created once)
"""

from __future__ import annotations

from typing import Any

import msgspec


class MemberRecord(msgspec.Struct, kw_only=True):
    group: str
    member: str  # unique on the cluster: process name, host and pid (names may repeat across hosts)
    name: str  # the process name the launcher gave it (`notify-0`)
    host: str
    pid: int
    started: float  # unix time
    beat: int = 0  # counts up every heartbeat: a value that stops changing is a dead member
    time: float = 0.0  # unix time of this beat (status only; liveness uses the reader's own clock)
    partitions: list[int] = []  # owned now
    stats: dict[str, int | float | str] = {}  # as Heartbeat.stats under the embedded engine
    metrics: dict[str, Any] = {}  # as Heartbeat.metrics: the member's metrics snapshot


class OwnerRecord(msgspec.Struct, kw_only=True):
    member: str = ""  # "" = free (released cleanly, or never owned, or reset)
    generation: int = 0  # bumped by every new owner; names its consumer (Names.consumer)
    consumer: str = ""  # the consumer the owner reads (and acks) through; "" = none yet
    # where a consumer made from this record starts when `consumer` is gone or reset:
    # 0 = from the group's start (GroupRecord)
    start_seq: int = 0
    # events at or below this seq were (maybe) handled before: ctx.redelivered
    redeliver_upto: int = 0
    # set by `nexus journal replay` / a reset: the next owner starts here, whatever the
    # old consumer acked (0 = no reset pending)
    reset_to: int = 0
    released: bool = False  # the last owner finished and acked what it handled, then let go
    # seqs of this partition that killed members max_crashes times (or timed out too often),
    # dead-lettered by the ingest's admin on the launcher's word (MemberExited.poison):
    # an owner passes over them (acks past without handling); the newest SKIP_KEPT are kept
    skip: list[int] = []


SKIP_KEPT = 100


class GroupRecord(msgspec.Struct, kw_only=True):
    start_seq: int  # the first stream seq the group reads (start: earliest -> the stream's first)
    created: float


encoder = msgspec.msgpack.Encoder()
member_decoder = msgspec.msgpack.Decoder(MemberRecord)
owner_decoder = msgspec.msgpack.Decoder(OwnerRecord)
group_decoder = msgspec.msgpack.Decoder(GroupRecord)
