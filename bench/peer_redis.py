"""Redis Streams doing the Nexus benchmark's work, with redis-py (hiredis parser) used as its
docs show, batched:

* producer: a non-transactional pipeline of XADD, executed every BATCH events (unpaced)
  or with whatever is due (paced), so one round trip carries many events;
* consumer: a consumer group; XREADGROUP COUNT BATCH BLOCK, the no-op handler per event,
  then one XACK for the batch.
"""

from __future__ import annotations

import contextlib
import time

from .peer_common import PACE_NAP, EventMaker, Pacer, Tally, producer_result, run_pair

STREAM = "bench"
GROUP = "bench"
BATCH = 500
FIELD = b"e"


def _producer(url: str, stream: str, count: int, rate: float, seconds: float, size: int, go, results, timeout) -> None:
    import redis

    sent, t_first, error = 0, 0.0, ""
    try:
        r = redis.Redis.from_url(url, socket_timeout=timeout)
        r.ping()
        make = EventMaker(size)
        pipe = r.pipeline(transaction=False)
        results.put({"ready": "producer"})
        if not go.wait(60):
            raise TimeoutError("no go signal within 60 s")
        pacer = Pacer(count, rate, seconds, BATCH)
        t_first = time.time()
        pacer.start()
        while (stop := pacer.due(sent)) >= 0:
            if stop == sent:
                time.sleep(PACE_NAP)
                continue
            for n in range(sent, stop):
                pipe.xadd(stream, {FIELD: make(n)})
            pipe.execute()
            sent = stop
        t_last = time.time()
        r.xadd(stream, {FIELD: make.end()})
    except Exception as exc:  # reported, never raised past the process
        error, t_last = f"redis producer: {type(exc).__name__}: {exc}", time.time()
    results.put(producer_result(sent, t_first, t_last, error))


def _consumer(url: str, stream: str, results, timeout: float) -> None:
    import redis

    tally, error = Tally(), ""
    try:
        r = redis.Redis.from_url(url, socket_timeout=5)
        r.ping()
        results.put({"ready": "consumer"})
        deadline = time.monotonic() + timeout
        while not tally.ended and time.monotonic() < deadline:
            reply = r.xreadgroup(GROUP, "c1", {stream: ">"}, count=BATCH, block=500)
            for _stream, entries in reply or ():  # RESP2 (the client's default): [[stream, entries]]
                ids = []
                for msg_id, fields in entries:
                    tally.handle(fields[FIELD])
                    ids.append(msg_id)
                if ids:
                    r.xack(stream, GROUP, *ids)
        if not tally.ended:
            error = f"redis consumer: no end marker within {timeout:g} s"
    except Exception as exc:
        error = f"redis consumer: {type(exc).__name__}: {exc}"
    results.put(tally.result(error))


def run_redis(url: str, count: int, rate: float, seconds: float, size: int, timeout: float, warmup: float) -> dict:
    """One run on a fresh stream and consumer group of the running server at `url`."""
    import redis

    stream = f"{STREAM}-{time.monotonic_ns()}"
    with redis.Redis.from_url(url) as r:
        r.xgroup_create(stream, GROUP, id="0", mkstream=True)
    try:
        return run_pair(
            "redis",
            _producer,
            (url, stream, count, rate, seconds, size),
            _consumer,
            (url, stream),
            timeout,
            warmup,
        )
    finally:
        with contextlib.suppress(redis.RedisError), redis.Redis.from_url(url) as r:  # never hides the run's error
            r.delete(stream)
