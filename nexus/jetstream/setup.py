"""Create (or bring up to date) the streams and the bucket a pipeline uses; idempotent,
so every engine process runs it at start and the first one to get there creates them."""

from __future__ import annotations

import asyncio
import time

from nats.errors import NoRespondersError
from nats.errors import TimeoutError as NatsTimeout
from nats.js import JetStreamContext, api
from nats.js.errors import BadRequestError, NotFoundError, ServiceUnavailableError

from nexus.config import Config
from nexus.jetstream.names import Names


def events_config(cfg: Config, names: Names) -> api.StreamConfig:
    n = cfg.nats
    return api.StreamConfig(
        name=names.stream,
        subjects=names.stream_subjects(),
        retention=api.RetentionPolicy.LIMITS,  # groups read at their own pace, like the journal
        storage=api.StorageType.FILE,
        num_replicas=n.replicas,
        max_age=float(n.max_age),
        max_bytes=int(n.max_bytes) if n.max_bytes else -1,
        duplicate_window=float(n.dedup_window),
        discard=api.DiscardPolicy.OLD,
        allow_direct=True,
    )


def dlq_config(cfg: Config, names: Names) -> api.StreamConfig:
    return api.StreamConfig(
        name=names.dlq_stream,
        subjects=names.dlq_subjects(),
        retention=api.RetentionPolicy.LIMITS,
        storage=api.StorageType.FILE,
        num_replicas=cfg.nats.replicas,
        duplicate_window=float(cfg.nats.dedup_window),  # a resent dead letter is stored once
        allow_direct=True,
    )


def rejected_config(cfg: Config, names: Names) -> api.StreamConfig:
    return api.StreamConfig(
        name=names.rejected_stream,
        subjects=[names.rejected_subject],
        retention=api.RetentionPolicy.LIMITS,
        storage=api.StorageType.FILE,
        num_replicas=cfg.nats.replicas,
        max_msgs=cfg.nats.rejected_max,  # bounded, oldest dropped (the embedded reject log's rule)
        discard=api.DiscardPolicy.OLD,
        allow_direct=True,
    )


async def _ensure_stream(js: JetStreamContext, config: api.StreamConfig) -> None:
    assert config.name is not None
    try:
        await js.stream_info(config.name)
    except NotFoundError:
        try:
            await js.add_stream(config)
            return
        except BadRequestError as exc:
            if exc.err_code != 10058:  # created meanwhile by another process: update below
                raise
    await js.update_stream(config)


# what a cluster says while it forms (no JetStream meta leader yet) or fails over
NOT_READY = (NatsTimeout, NoRespondersError, ServiceUnavailableError, asyncio.TimeoutError)
# and while its meta leader has not met enough peers for the replicas yet (also what a
# cluster smaller than `replicas` says for ever: the log line names it)
NO_PEERS_YET = 10005  # "no suitable peers for placement"


def _not_ready(exc: Exception) -> bool:
    return isinstance(exc, NOT_READY) or (isinstance(exc, BadRequestError) and exc.err_code == NO_PEERS_YET)


async def ensure(js: JetStreamContext, cfg: Config, timeout: float | None = None, log=None) -> Names:
    """Create or update the streams and bucket, waiting (up to `timeout`, None: for ever)
    while the cluster cannot answer yet."""
    deadline = None if timeout is None else time.monotonic() + timeout
    while True:
        try:
            return await _ensure(js, cfg)
        except Exception as exc:
            if not _not_ready(exc) or (deadline is not None and time.monotonic() > deadline):
                raise
            if log is not None:
                log.info("jetstream_not_ready", error=repr(exc))
            await asyncio.sleep(0.5)


async def _ensure(js: JetStreamContext, cfg: Config) -> Names:
    names = Names.of(cfg)
    for config in (events_config(cfg, names), dlq_config(cfg, names), rejected_config(cfg, names)):
        await _ensure_stream(js, config)
    await js.create_key_value(
        api.KeyValueConfig(bucket=names.bucket, history=1, replicas=cfg.nats.replicas, storage=api.StorageType.FILE)
    )
    return names
