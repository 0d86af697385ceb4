"""A partition's JetStream consumer: made per owner generation, read in batches, acked with
AckAll on the message of the seq handled up to.

One durable pull consumer per (partition, generation), filtered to the partition's shard
subjects. A new owner makes the next generation's consumer and deletes the old one, so a
paused old owner's late acks reach nothing."""

from __future__ import annotations

import asyncio
import collections
from dataclasses import dataclass, field
from typing import Any

from nats.aio.msg import Msg
from nats.errors import TimeoutError as NatsTimeout
from nats.js import JetStreamContext, api
from nats.js.errors import NotFoundError

from nexus.jetstream.records import OwnerRecord
from nexus.jsmember.ownership import ConsumerState
from nexus.member.stream import PartitionStream

FETCH_BATCH = 256
FETCH_WAIT = 1.0  # seconds a fetch waits for the first message
MAX_ACK_PENDING = 4 * FETCH_BATCH  # delivered, unacked messages per partition (JetStream bounds it)
QUEUE_HIGH = 2 * FETCH_BATCH  # queued events per partition above which fetching pauses


@dataclass
class Owned:
    """A partition this member owns now: its owner record (at `revision`), the stream the
    scheduler runs, and the messages delivered but not acked yet."""

    partition: int
    revision: int
    record: OwnerRecord
    stream: PartitionStream
    psub: Any = None
    task: asyncio.Task | None = None  # the fetch loop
    delivered: collections.deque[tuple[int, Msg]] = field(default_factory=collections.deque)
    lost: asyncio.Event = field(default_factory=asyncio.Event)  # set: stop at once, ack nothing
    releasing: bool = False
    consumer_seq: int = 0  # the consumer's delivery count of the last message read

    def take_acks(self, upto: int) -> Msg | None:
        """The message to AckAll for `upto`: the last delivered at or below it."""
        last = None
        while self.delivered and self.delivered[0][0] <= upto:
            last = self.delivered.popleft()[1]
        return last


def consumer_config(name: str, subjects: list[str], start: int, ack_wait: float, replicas: int) -> api.ConsumerConfig:
    return api.ConsumerConfig(
        durable_name=name,
        filter_subjects=subjects,
        deliver_policy=api.DeliverPolicy.BY_START_SEQUENCE,
        opt_start_seq=start,
        ack_policy=api.AckPolicy.ALL,
        ack_wait=ack_wait,  # well above handler_timeout: a slow call is not redelivered under us
        max_ack_pending=MAX_ACK_PENDING,
        max_deliver=-1,
        num_replicas=replicas,
    )


async def open_consumer(js: JetStreamContext, stream: str, config: api.ConsumerConfig) -> Any:
    await js.add_consumer(stream, config=config)
    assert config.durable_name is not None
    return await js.pull_subscribe_bind(durable=config.durable_name, stream=stream)


async def consumer_state(js: JetStreamContext, stream: str, name: str) -> ConsumerState | None:
    try:
        info = await js.consumer_info(stream, name)
    except NotFoundError:
        return None
    return ConsumerState(
        ack_floor=info.ack_floor.stream_seq if info.ack_floor else 0,
        start=(info.config.opt_start_seq or 1),
        delivered=info.delivered.stream_seq if info.delivered else 0,
    )


async def delete_consumer(js: JetStreamContext, stream: str, name: str) -> None:
    try:
        await js.delete_consumer(stream, name)
    except NotFoundError:
        pass


async def fetch(psub: Any) -> list[Msg]:
    """The next batch; [] when nothing arrived within FETCH_WAIT."""
    try:
        return await psub.fetch(FETCH_BATCH, timeout=FETCH_WAIT)
    except (TimeoutError, NatsTimeout):
        return []
