"""Messages on the wire between producers, the router and members.

Every message is one msgpack frame (plus a topic frame on `publish`), decoded into
one of these typed structs; docs/PROTOCOL.md describes them for other languages.
"""

from __future__ import annotations

from typing import Any, Union

import msgspec

# -- producer -> router (ingest PUSH/PULL and confirm DEALER/ROUTER) -------------


class ProducerBatch(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """`events` are msgpack-encoded `Event` maps; in confirm mode they carry the
    producer sequence numbers seq, seq+1, ... in order."""

    events: list[msgspec.Raw]
    producer: str = ""
    seq: int = 0
    floor: int = 0  # every producer seq below this is settled for the producer


class Nack(msgspec.Struct, frozen=True, array_like=True):
    seq: int  # producer seq of the rejected event
    reason: str
    retry_after: float = 0.0  # >0: rejected for rate; send again after this many seconds


class ProducerReply(msgspec.Struct, frozen=True, omit_defaults=True):
    """Router -> confirm producer: every producer seq <= `ack` is settled: journaled,
    unless it is listed in `nacks`. `error` is set when the message was unreadable."""

    ack: int = 0
    nacks: list[Nack] = []
    error: str = ""


# -- router -> member (publish XPUB/SUB), frames: [topic, Delivery] --------------


class Delivery(msgspec.Struct, frozen=True, array_like=True):
    """Consecutive events of one group/partition stream. `prev` is the seq of the
    stream's event before seqs[0] (0 when none), so a member can see gaps."""

    prev: int
    seqs: list[int]
    events: list[msgspec.Raw]


TAIL_TOPIC = b"~tail"


def topic(group: str, partition: int) -> bytes:
    return f"{group}/{partition}".encode()


# -- coord: member DEALER <-> router ROUTER; CLI REQ/DEALER -> router -------------


class Coord(msgspec.Struct, frozen=True, tag_field="op", forbid_unknown_fields=True):
    """Base of the coord messages (each subclass repeats frozen=True only for type checkers)."""


class Join(Coord, tag="join", frozen=True):
    group: str
    member: str
    host: str = ""
    pid: int = 0
    holding: dict[int, int] = {}  # rejoining after a router restart: partition -> handled up to


class Heartbeat(Coord, tag="hb", frozen=True):
    group: str
    member: str
    stats: dict[str, int | float | str] = {}  # member counters and breaker state, for status
    metrics: dict[str, Any] = {}  # the member's metrics snapshot (nexus/common/metrics.py), for scrapes


class Ack(Coord, tag="ack", frozen=True):
    group: str
    member: str
    acks: dict[int, int]


class Released(Coord, tag="released", frozen=True):
    """Member gave up partitions after a revoke, with its final acks."""

    group: str
    member: str
    acks: dict[int, int]


class Leave(Coord, tag="leave", frozen=True):
    group: str
    member: str
    acks: dict[int, int] = {}
    busy: list[int] = []  # partitions whose head call still ran at the drain deadline


class Fetch(Coord, tag="fetch", frozen=True):
    group: str
    member: str
    partition: int
    after: int
    limit: int = 1000


class StatusRequest(Coord, tag="status", frozen=True):
    pass


class MetricsRequest(Coord, tag="metrics", frozen=True):
    """Admin -> router: the router's metrics snapshot and its members' latest ones,
    answered with Reply({"router": snapshot, "members": {"GROUP/MEMBER": snapshot}})."""


class DeadLetter(Coord, tag="dead_letter", frozen=True):
    """Member -> router, before the member acks the event: store it in the DLQ."""

    group: str
    member: str
    seq: int
    partition: int
    event: msgspec.Raw
    error_type: str
    error: str
    traceback: str
    attempts: int
    first_failed: float


class MemberExited(Coord, tag="member_exited", frozen=True):
    """Launcher -> router: a member process ended (crash, hang kill, recycle). The
    router frees its partitions at once instead of waiting for missed heartbeats.
    `inflight` names the events its black box says it was handling (partition -> seqs);
    `poison` lists those the launcher has now seen kill a member `max_crashes` times
    (or time out `retry.attempts` times): the router dead-letters each with `reason`
    and the group's next owner skips it. Answered with a Reply."""

    group: str
    member: str
    exit_code: int  # negative: killed by that signal
    reason: str = ""  # "crashed", "handler_timeout", "hung" (a recycle is not told)
    inflight: dict[int, list[int]] = {}
    poison: dict[int, list[int]] = {}
    pid: int = 0  # the exited process (0: unknown): a newer one may have joined


class DeadLetterStored(Coord, tag="dead_letter_stored", frozen=True):
    """Router -> member: the DeadLetter of (partition, seq) is stored; only now may the
    member move past it and ack it. Until then it resends the DeadLetter on a timeout."""

    group: str
    partition: int
    seq: int


class DlqRequest(Coord, tag="dlq", frozen=True):
    action: str  # list | show | replay | purge
    ids: list[int] = []
    group: str | None = None
    type: str | None = None
    all: bool = False
    # replay by group or --all in pages: rows with id > after, at most limit (0: all of them)
    after: int = 0
    limit: int = 0


class ReloadRequest(Coord, tag="reload", frozen=True):
    config: bytes = b""  # the config the launcher validated (config.to_bytes); empty: re-read the file


class ReplayRequest(Coord, tag="replay", frozen=True):
    group: str
    from_seq: int = 0
    from_time: float = 0.0


class Assign(Coord, tag="assign", frozen=True):
    """The member's full partition set. `grants` holds the newly granted partitions
    with the cursor to start after; partitions missing from `partitions` are revoked."""

    group: str
    partitions: list[int]
    grants: dict[int, int] = {}
    redelivered: dict[int, int] = {}  # granted partition -> events <= this may be seen again
    replay: bool = False  # grants rewind the member's streams (journal replay)
    skip: dict[int, list[int]] = {}  # granted partition -> seqs to pass over (dead-lettered poison)
    solo: dict[int, list[int]] = {}  # granted partition -> seqs to run alone (in flight at a crash with others)


class Pulse(Coord, tag="pulse", frozen=True):
    """Heartbeat answer: the last seq of each of the member's partition streams."""

    heads: dict[int, int] = {}


class Records(Coord, tag="records", frozen=True):
    group: str
    partition: int
    after: int
    upto: int  # every stream event <= upto is in this reply or earlier
    seqs: list[int]
    events: list[msgspec.Raw]
    complete: bool = True  # False: more to fetch after `upto`


class Read(Coord, tag="read", frozen=True):
    """Admin -> router: journal events with seq > `after` whose type matches one of
    `types` (fnmatch globs; empty: every type), in journal order, for live consumers
    (the gateway's /v1/subscribe). Bounded like a member's fetch: at most `limit` events
    (and the router's fetch_limit) and `max_bytes` of them (0: the router's fetch_bytes;
    always at least one event), and a bounded scan. `limit` 0 reads nothing: the answer
    only tells the journal's positions. Events re-journaled for one group only (a
    dead-letter replay) are left out: a consumer has seen them. Needs an admin key when
    CURVE is on. Answered with `Journaled` (or `Error`)."""

    after: int
    limit: int = 1000
    types: list[str] = []
    max_bytes: int = 0


class Journaled(Coord, tag="journaled", frozen=True):
    """Router -> the sender of `Read`. `seqs`/`events` (wire `Event` maps) are the matching
    events after `after`; every matching event <= `upto` is in this reply or was before
    it, so the next `Read` asks after `upto`. `first` is the journal's first retained seq
    (events below it are gone: `after` < first - 1 means a gap), `last` its last seq."""

    after: int
    upto: int
    first: int
    last: int
    seqs: list[int] = []
    events: list[msgspec.Raw] = []


class Reply(Coord, tag="reply", frozen=True):
    """Generic answer to CLI requests: `data` is a plain mapping."""

    data: dict = {}


class Error(Coord, tag="error", frozen=True):
    reason: str
    code: str = "error"  # "unknown_member", "unknown_group", "bad_message"


CoordMessage = Union[  # noqa: UP007 - a long tagged union reads better one member per line
    Join,
    Heartbeat,
    Ack,
    Released,
    Leave,
    Fetch,
    StatusRequest,
    MetricsRequest,
    DeadLetter,
    DeadLetterStored,
    MemberExited,
    DlqRequest,
    ReloadRequest,
    ReplayRequest,
    Assign,
    Pulse,
    Records,
    Read,
    Journaled,
    Reply,
    Error,
]

# -- control: CLI / tests DEALER -> launcher ROUTER ---------------------------------


class ControlRequest(msgspec.Struct, frozen=True):
    """A request to the launcher. The reply is a plain map (`ControlReply`): "ok" (bool),
    "error" (str) when not ok, and per command: status "processes", "ready", "scale"
    (desired members per group), "autoscale" (per autoscaled group), "reload", "launcher";
    scale "group", "old", "new"; reload "changes", "needs_restart", "rate_limits",
    "in_progress", "rolling" (a dry run: "dry_run", "changes", "needs_restart"); stop nothing."""

    cmd: str  # status | scale | stop | reload
    group: str = ""
    n: int = 0
    dry_run: bool = False  # reload: say what would change, apply nothing


ControlReply = dict[str, Any]

encoder = msgspec.msgpack.Encoder()
batch_decoder = msgspec.msgpack.Decoder(ProducerBatch)
reply_decoder = msgspec.msgpack.Decoder(ProducerReply)
delivery_decoder = msgspec.msgpack.Decoder(Delivery)
coord_decoder = msgspec.msgpack.Decoder(CoordMessage)
coord_reply_decoder = msgspec.msgpack.Decoder(Reply | Error)  # an answer to a request
journaled_decoder = msgspec.msgpack.Decoder(Journaled | Error)  # the answer to a Read
control_decoder = msgspec.msgpack.Decoder(ControlRequest)
control_reply_decoder = msgspec.msgpack.Decoder(ControlReply)
