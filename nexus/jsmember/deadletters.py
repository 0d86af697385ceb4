"""Publishing what leaves a partition without being handled: dead letters (to the group's
DLQ subject) and rejected messages (to the rejected stream). Both are published until
JetStream's PubAck says they are stored; only then may the partition move past them.
Nats-Msg-Id makes a resend (by us, or by a next owner) stored once."""

from __future__ import annotations

import asyncio
from typing import Any

from nats.errors import Error as NatsError
from nats.js import JetStreamContext

from nexus.jetstream import names as h

RESEND_AFTER = 1.0  # seconds between tries while JetStream does not confirm
PUBLISH_TIMEOUT = 5.0
HEADER_MAX = 1024  # characters of an error message kept in a header


def header_text(text: str) -> str:
    """A header value: one line, bounded."""
    return " ".join(text.split())[:HEADER_MAX]


def dead_letter_headers(group: str, partition: int, seq: int, error: BaseException, attempts: int) -> dict[str, str]:
    return {
        h.H_GROUP: group,
        h.H_PARTITION: str(partition),
        h.H_SEQ: str(seq),
        h.H_ERROR: header_text(f"{type(error).__name__}: {error}"),
        h.H_ATTEMPTS: str(attempts),
        h.MSG_ID: f"{group}:{seq}",
    }


def rejected_headers(group: str, seq: int, reason: str) -> dict[str, str]:
    return {
        h.H_REASON: header_text(reason),
        h.H_SOURCE: f"group:{group}",
        h.H_SEQ: str(seq),
        h.MSG_ID: f"rejected:{group}:{seq}",
    }


async def publish_stored(
    js: JetStreamContext, subject: str, data: bytes, headers: dict[str, str], log: Any, stop: asyncio.Event
) -> bool:
    """Publish until JetStream confirms it stored the message; False when `stop` was set
    first (the partition was lost: the next owner publishes it again)."""
    while not stop.is_set():
        try:
            await js.publish(subject, data, timeout=PUBLISH_TIMEOUT, headers=headers)
            return True
        except (TimeoutError, NatsError) as exc:
            log.warning("publish_unconfirmed", subject=subject, error=repr(exc), retry_in=RESEND_AFTER)
            try:
                async with asyncio.timeout(RESEND_AFTER):
                    await stop.wait()
            except TimeoutError:
                pass
    return False
