"""NATS JetStream doing the Nexus benchmark's work, with nats-py used as its docs show, batched:

* a file-storage stream and a durable pull consumer (explicit ack), made by the parent;
* producer: `js.publish_async` (many publishes in flight, up to the client's 4,000), the
  acks of each batch of BATCH awaited once WINDOW events are further on, the rest at the end;
* consumer: pull subscription, `fetch(FETCH)`, the no-op handler and `msg.ack()` per message.
"""

from __future__ import annotations

import asyncio
import contextlib
import time

from .peer_common import PACE_NAP, EventMaker, Pacer, Tally, producer_result, run_pair

STREAM = "BENCH"
DURABLE = "bench"
BATCH = 500
WINDOW = 3_500  # events whose acks may be outstanding (below nats-py's publish_async cap, 4,000)
FETCH = 256


def _producer(url: str, subject: str, count: int, rate: float, seconds: float, size: int, go, results, timeout) -> None:
    results.put(asyncio.run(_produce(url, subject, count, rate, seconds, size, go, results, timeout)))


async def _produce(url, subject, count, rate, seconds, size, go, results, timeout) -> dict:
    import nats

    sent, t_first, t_last, error = 0, 0.0, 0.0, ""
    nc = None
    try:
        nc = await nats.connect(url, connect_timeout=5, allow_reconnect=False)
        js = nc.jetstream(timeout=timeout)
        make = EventMaker(size)
        results.put({"ready": "producer"})
        if not await asyncio.to_thread(go.wait, 60):
            raise TimeoutError("no go signal within 60 s")
        pacer = Pacer(count, rate, seconds, BATCH)
        in_flight: list[list[asyncio.Future]] = []  # one list of ack futures per batch
        pending = 0
        t_first = time.time()
        pacer.start()
        while (stop := pacer.due(sent)) >= 0:
            if stop == sent:
                await asyncio.sleep(PACE_NAP)
                continue
            in_flight.append([await js.publish_async(subject, make(n)) for n in range(sent, stop)])
            pending += stop - sent
            sent = stop
            while pending > WINDOW:  # await the oldest batch's acks
                batch = in_flight.pop(0)
                await asyncio.gather(*batch)
                pending -= len(batch)
        t_last = time.time()
        for batch in in_flight:
            await asyncio.gather(*batch)  # raises if the server refused one
        await js.publish(subject, make.end())
    except Exception as exc:  # reported, never raised past the process
        error, t_last = f"nats producer: {type(exc).__name__}: {exc}", t_last or time.time()
    finally:
        if nc is not None:
            await nc.close()
    return producer_result(sent, t_first, t_last, error)


def _consumer(url: str, subject: str, results, timeout: float) -> None:
    results.put(asyncio.run(_consume(url, subject, results, timeout)))


async def _consume(url, subject, results, timeout) -> dict:
    import nats

    tally, error = Tally(), ""
    nc = None
    try:
        nc = await nats.connect(url, connect_timeout=5, allow_reconnect=False)
        js = nc.jetstream()
        sub = await js.pull_subscribe_bind(DURABLE, stream=_stream(subject))
        results.put({"ready": "consumer"})
        deadline = time.monotonic() + timeout
        while not tally.ended and time.monotonic() < deadline:
            try:
                msgs = await sub.fetch(FETCH, timeout=1)
            except nats.errors.TimeoutError:
                continue
            for msg in msgs:
                tally.handle(msg.data)
                await msg.ack()
        await nc.flush(5)  # the last acks leave before the connection closes
        if not tally.ended:
            error = f"nats consumer: no end marker within {timeout:g} s"
    except Exception as exc:
        error = f"nats consumer: {type(exc).__name__}: {exc}"
    finally:
        if nc is not None:
            await nc.close()
    return tally.result(error)


def _stream(subject: str) -> str:
    return f"{STREAM}_{subject.rsplit('.', 1)[-1]}"


async def _setup(url: str, subject: str, create: bool) -> None:
    import nats
    from nats.js.api import AckPolicy, ConsumerConfig, StorageType

    nc = await nats.connect(url, connect_timeout=5, allow_reconnect=False)
    try:
        js = nc.jetstream()
        if create:
            await js.add_stream(name=_stream(subject), subjects=[subject], storage=StorageType.FILE)
            await js.add_consumer(_stream(subject), ConsumerConfig(durable_name=DURABLE, ack_policy=AckPolicy.EXPLICIT))
        else:
            await js.delete_stream(_stream(subject))
    finally:
        await nc.close()


def run_nats(url: str, count: int, rate: float, seconds: float, size: int, timeout: float, warmup: float) -> dict:
    """One run on a fresh stream and durable consumer of the running server at `url`."""
    subject = f"bench.r{time.monotonic_ns()}"
    asyncio.run(_setup(url, subject, create=True))
    try:
        return run_pair(
            "nats",
            _producer,
            (url, subject, count, rate, seconds, size),
            _consumer,
            (url, subject),
            timeout,
            warmup,
        )
    finally:
        import nats

        with contextlib.suppress(nats.errors.Error, OSError, asyncio.TimeoutError):  # never hides the run's error
            asyncio.run(_setup(url, subject, create=False))
