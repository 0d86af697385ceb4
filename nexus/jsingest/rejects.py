"""Which events of a batch were rejected for what they are, as the records the ingest keeps
in `{stream}_REJECTED`: the raw bytes (cut at max_event_bytes) with the reason and the
sender in headers, so an operator can see what was refused and send it again fixed.

Retryable refusals (rate limits, sequence gaps) are not kept: the producer sends those
events again. NACKs repeated for a resent batch were kept the first time."""

from __future__ import annotations

from dataclasses import dataclass

from nexus.jetstream.names import H_REASON, H_SOURCE
from nexus.protocol.events import DECODE_ERRORS
from nexus.protocol.wire import batch_decoder
from nexus.router.intake import Outcome

RETRYABLE = ("rate_limited", "sequence_gap")
MAX_REASON = 1000  # characters of a reason header


@dataclass(frozen=True)
class Rejected:
    reason: str  # "category: detail", as NACKed
    source: str  # the producer id, "nats" for the request intake
    payload: bytes

    def headers(self) -> dict[str, str]:
        return {H_REASON: _header(self.reason), H_SOURCE: _header(self.source) or "unknown"}


def _header(text: str) -> str:
    """Header values are one line."""
    return " ".join(text.split())[:MAX_REASON]


def category(reason: str) -> str:
    return reason.partition(":")[0]


def rejected(frame: bytes, outcome: Outcome, max_bytes: int, source: str = "") -> list[Rejected]:
    """The records to keep for one producer message and what intake made of it."""
    if outcome.error:
        # the whole message was refused (unreadable, too many events, a forbidden id)
        return [Rejected(outcome.error, source, bytes(frame[:max_bytes]))]
    nacks = [n for n in outcome.nacks if category(n.reason) not in RETRYABLE]
    if not nacks:
        return []
    try:
        batch = batch_decoder.decode(frame)
    except DECODE_ERRORS:  # intake read it a moment ago
        return []
    who = source or batch.producer
    first_new = batch.seq + outcome.duplicates  # below: NACKs repeated for a resend
    out = []
    for nack in nacks:
        i = nack.seq - batch.seq
        if nack.seq >= first_new and 0 <= i < len(batch.events):
            out.append(Rejected(nack.reason, who, bytes(batch.events[i])[:max_bytes]))
    return out
