"""Every name Nexus uses on a NATS cluster, derived from `nats.stream`, in one place.

Events go to `nexus.{stream}.ev.{shard}`, shard = key hash % `nats.shards` (the key hash
of nexus.protocol.partitions). A group with P partitions (P divides shards) reads, for
partition p, the shards s with s % P == p, so an event lands in the same partition number
as under the embedded engine. Events replayed into one group only (a dead letter, `nexus
dlq replay`) go to `nexus.{stream}.rp.{group}.{shard}`, which only that group reads.
"""

from __future__ import annotations

from nexus.protocol.partitions import key_hash, partition_key

# message headers (Nats-Msg-Id is JetStream's own: dedup within the stream's window)
MSG_ID = "Nats-Msg-Id"
H_GROUP = "Nexus-Group"
H_PARTITION = "Nexus-Partition"
H_SEQ = "Nexus-Seq"  # the event's seq in the events stream (dead letters)
H_ERROR = "Nexus-Error"  # why it was dead-lettered
H_ATTEMPTS = "Nexus-Attempts"
H_REASON = "Nexus-Reason"  # why it was rejected
H_SOURCE = "Nexus-Source"  # who sent a rejected message (producer id or "nats")


class Names:
    def __init__(self, stream: str, shards: int):
        self.stream = stream
        self.shards = shards
        self.prefix = f"nexus.{stream}"
        self.dlq_stream = f"{stream}_DLQ"
        self.rejected_stream = f"{stream}_REJECTED"
        self.bucket = f"{stream}_groups"  # KV: members, partition owners, group starts
        # request/reply intake for any NATS client: validated, then stored (jsingest)
        self.ingest_subject = f"{self.prefix}.in"
        self.ingest_queue = f"nexus-{stream}-ingest"
        self.rejected_subject = f"{self.prefix}.rejected"

    @classmethod
    def of(cls, cfg) -> Names:
        return cls(cfg.nats.stream, cfg.nats.shards)

    # -- the events stream --------------------------------------------------------------
    def stream_subjects(self) -> list[str]:
        return [f"{self.prefix}.ev.*", f"{self.prefix}.rp.*.*"]

    def shard_of(self, key: str | None, source: str) -> int:
        return key_hash(partition_key(key, source)) % self.shards

    def event_subject(self, shard: int) -> str:
        return f"{self.prefix}.ev.{shard}"

    def replay_subject(self, group: str, shard: int) -> str:
        return f"{self.prefix}.rp.{group}.{shard}"

    def partition_subjects(self, group: str, partition: int, partitions: int) -> list[str]:
        """The subjects partition `partition` of `group` reads (its consumer's filter)."""
        shards = range(partition, self.shards, partitions)
        return [self.event_subject(s) for s in shards] + [self.replay_subject(group, s) for s in shards]

    # -- dead letters -------------------------------------------------------------------
    def dlq_subject(self, group: str) -> str:
        return f"{self.prefix}.dlq.{group}"

    def dlq_subjects(self) -> list[str]:
        return [f"{self.prefix}.dlq.*"]

    # -- the KV bucket ------------------------------------------------------------------
    @staticmethod
    def member_key(group: str, member: str) -> str:
        return f"m.{group}.{member}"

    @staticmethod
    def owner_key(group: str, partition: int) -> str:
        return f"o.{group}.{partition}"

    @staticmethod
    def group_key(group: str) -> str:
        return f"g.{group}"

    @staticmethod
    def consumer(group: str, partition: int, generation: int) -> str:
        """A partition's consumer; a new owner makes a new generation, so an old owner's
        late acks reach a consumer that no longer exists instead of the new one."""
        return f"{group}-p{partition}-g{generation}"
