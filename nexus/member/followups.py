"""Follow-up events a handler emitted (ctx.emit), settled before their cause counts as
handled (no sockets: the runtime's producer sends them and waits for the router's answer).

The cause's head stays busy, so nothing past it is acked, until the router answered for
every follow-up; settlement is batched across partitions (one producer flush for all the
follow-ups emitted meanwhile). A follow-up the router rejected fails its cause's call with
the router's reason (retry, then dead letter).
"""

from __future__ import annotations

from nexus.errors import RejectedError
from nexus.member.stream import PartitionStream

MAX_ERRORS = 100_000  # rejections kept until matched to their cause


class FollowUps:
    def __init__(self) -> None:
        self.waiting: list[tuple[PartitionStream, int, list[str]]] = []  # (stream, seq, follow-up ids)
        self.errors: dict[str, RejectedError] = {}  # follow-up id -> its rejection
        self.rejected = 0  # causes failed by a rejected follow-up

    def add(self, st: PartitionStream, ids: list[str]) -> None:
        """`st`'s head emitted follow-ups `ids`: it waits for them."""
        self.waiting.append((st, st.queue[0][0], ids))

    def take(self) -> list[tuple[PartitionStream, int, list[str]]]:
        """The causes waiting now, for one settlement."""
        batch, self.waiting = self.waiting, []
        return batch

    def rejections(self, errors: list[RejectedError]) -> None:
        for e in errors:
            if len(self.errors) < MAX_ERRORS:
                self.errors[e.event_id] = e

    def outcomes(
        self, batch: list[tuple[PartitionStream, int, list[str]]]
    ) -> list[tuple[PartitionStream, RejectedError | None]]:
        """Once the router answered for a batch: each cause still at the head of its stream,
        with the rejection of one of its follow-ups (None: all were taken)."""
        out = []
        for st, seq, ids in batch:
            if not st.busy or not st.queue or st.queue[0][0] != seq:
                continue  # dropped meanwhile (revoked, replay): comes again
            error = next((self.errors.pop(i) for i in ids if i in self.errors), None)
            for i in ids:
                self.errors.pop(i, None)
            if error is not None:
                self.rejected += 1
            out.append((st, error))
        return out
