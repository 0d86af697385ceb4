"""Who should own which partition, and from where a new owner reads (pure policy, no I/O).

Every member computes the same balanced target from the same view (the sorted live
members and the partitions' live owners) and acts only on its own part: it lets go of
what the target gives to others and takes what it is given once that is free.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from typing import NamedTuple

from nexus.jetstream.names import Names
from nexus.jetstream.records import OwnerRecord


def member_id(name: str, host: str, pid: int) -> str:
    """Unique on the cluster (names repeat across hosts, pids across restarts of a host)."""
    return re.sub(r"[^A-Za-z0-9_-]", "_", f"{name}-{host}-{pid}")


def target(members: Sequence[str], partitions: int, owners: Mapping[int, str]) -> dict[int, str]:
    """partition -> member. Quotas are the floor or ceiling of partitions/members (the
    ceilings go to who owns most now, so a balanced group stays as it is); a member keeps
    what it owns up to its quota, the rest goes to members under quota in order.
    `owners`: the partitions' live owners (free or dead-owned ones left out)."""
    ordered = sorted(set(members))
    if not ordered:
        return {}
    owned: dict[str, list[int]] = {m: [] for m in ordered}
    for p in range(partitions):
        m = owners.get(p)
        if m in owned:
            owned[m].append(p)
    base, extra = divmod(partitions, len(ordered))
    by_holding = sorted(ordered, key=lambda m: (-len(owned[m]), m))
    quota = {m: base + (1 if i < extra else 0) for i, m in enumerate(by_holding)}
    out: dict[int, str] = {}
    for m in ordered:
        for p in owned[m][: quota[m]]:
            out[p] = m
    free = iter(p for p in range(partitions) if p not in out)
    for m in ordered:
        for _ in range(quota[m] - len(owned[m][: quota[m]])):
            out[next(free)] = m
    return out


class ConsumerState(NamedTuple):
    """What a partition's current consumer says (from its consumer info)."""

    ack_floor: int  # stream seq of the last ack (0: nothing acked)
    start: int  # the seq it was made to start at
    delivered: int  # stream seq of the last message it handed out (0: none)


def take_plan(
    group: str,
    partition: int,
    me: str,
    record: OwnerRecord | None,
    consumer: ConsumerState | None,
    group_start: int,
) -> OwnerRecord:
    """The owner record a member writes (compare-and-set) to take `partition`: a new
    generation, so a fresh consumer, starting after what the last owner acked; what the
    last owner may have handed to its handler is flagged ctx.redelivered, unless it let go
    cleanly (then it acked everything it handled, and only what an owner before it may
    have handled is flagged)."""
    old = record or OwnerRecord()
    if old.reset_to:
        start = old.reset_to
    elif consumer is not None:
        start = consumer.ack_floor + 1 if consumer.ack_floor else consumer.start
    else:
        start = old.start_seq or group_start
    if old.released:
        # the last owner acked all it handled; what an earlier, crashed owner may have
        # handled past that is still flagged (released() keeps it)
        redeliver = old.redeliver_upto
    elif consumer is not None:
        redeliver = max(consumer.delivered, old.redeliver_upto)
    else:
        redeliver = old.redeliver_upto
    generation = old.generation + 1
    return OwnerRecord(
        member=me,
        generation=generation,
        consumer=Names.consumer(group, partition, generation),
        start_seq=max(start, 1),
        redeliver_upto=redeliver if redeliver >= start else 0,
        skip=old.skip,  # (poison stays passed over whoever owns the partition)
    )


def released(record: OwnerRecord, acked_upto: int) -> OwnerRecord:
    """The record a clean owner leaves: free, its consumer kept (its ack floor is where the
    next owner starts), `start_seq` for when that consumer is gone."""
    return OwnerRecord(
        member="",
        generation=record.generation,
        consumer=record.consumer,
        start_seq=max(acked_upto + 1, record.start_seq),
        # (an owner that let go before it reached the events a crashed owner before it
        # may have handled passes the flag on: a clean release is not a clean history)
        redeliver_upto=record.redeliver_upto if record.redeliver_upto > acked_upto else 0,
        released=True,
        skip=record.skip,
    )
