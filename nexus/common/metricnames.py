"""Every metric Nexus exposes: name, type, labels and help text, in one table.

The router and members record under these names (nexus/router/telemetry.py,
nexus/member/telemetry.py), the exposition renders them with this help text
(nexus/http/exposition.py), and docs/operations.md lists them (a unit test keeps the
three in step). The names are a contract: dashboards (deploy/grafana) are built on them.

Member metrics are recorded without `group` and `member`: the router knows whose
snapshot it holds, and the exposition adds both labels.
"""

from __future__ import annotations

from typing import NamedTuple


class Spec(NamedTuple):
    kind: str  # counter | gauge | histogram
    labels: tuple[str, ...]  # as exposed
    help: str


# -- router ---------------------------------------------------------------------------
ACCEPTED = "nexus_events_accepted_total"
REJECTED = "nexus_events_rejected_total"
DUPLICATES = "nexus_duplicates_dropped_total"
JOURNAL_BYTES = "nexus_journal_bytes"
JOURNAL_SEGMENTS = "nexus_journal_segments"
JOURNAL_LAST_SEQ = "nexus_journal_last_seq"
JOURNAL_APPEND = "nexus_journal_append_seconds"
JOURNAL_FSYNC = "nexus_journal_fsync_seconds"
GROUP_LAG = "nexus_group_lag_events"
PARTITION_LAG = "nexus_partition_lag_events"
PARTITION_CURSOR = "nexus_partition_cursor"
FETCHES = "nexus_fetches_total"
DEAD_LETTERS = "nexus_dead_letters"
PRODUCERS = "nexus_producers_connected"
LOOP_LAG = "nexus_router_loop_lag_seconds"
STORAGE_OK = "nexus_storage_ok"
# -- engine nats (the ingest process's admin, from the cluster) ---------------------------
NATS_LEADER = "nexus_nats_stream_leader"
NATS_REPLICAS_CURRENT = "nexus_nats_replicas_current"
NATS_CONSUMER_LAG = "nexus_nats_consumer_lag_events"
# -- members ----------------------------------------------------------------------------
HANDLER_DURATION = "nexus_handler_duration_seconds"
OUTCOMES = "nexus_handler_outcomes_total"
EVENT_LATENCY = "nexus_event_latency_seconds"
REDELIVERIES = "nexus_redeliveries_total"
GAP_REPAIRS = "nexus_gap_repairs_total"
BREAKER = "nexus_breaker_state"
# -- launcher (from its status reply) ------------------------------------------------------
PROCESS_UP = "nexus_process_up"
PROCESS_RESTARTS = "nexus_process_restarts_total"
MEMBERS_DESIRED = "nexus_group_members_desired"
MEMBERS = "nexus_group_members"
READY = "nexus_ready"
AUTOSCALE_DECISIONS = "nexus_autoscale_decisions_total"
# -- gateway (its own /metrics: nexus/gateway/access.py) ------------------------------------
GW_REQUESTS = "nexus_gateway_requests_total"
GW_EVENTS = "nexus_gateway_events_total"
GW_AUTH_REFUSED = "nexus_gateway_auth_refused_total"
GW_UNSETTLED = "nexus_gateway_unsettled_events"
GW_STREAMS = "nexus_gateway_streams"

GM = ("group", "member")

CATALOGUE: dict[str, Spec] = {
    ACCEPTED: Spec("counter", ("type", "source"), "Events journaled, by event type and source."),
    REJECTED: Spec(
        "counter",
        ("reason", "type", "source"),
        "Events (or whole batches) refused at intake, by reason, event type and source.",
    ),
    DUPLICATES: Spec(
        "counter",
        ("stage",),
        "Duplicates dropped: stage=intake (producer resends, ACKed again) or member (dedup window).",
    ),
    JOURNAL_BYTES: Spec("gauge", (), "Bytes in the journal's segment files."),
    JOURNAL_SEGMENTS: Spec("gauge", (), "Journal segment files."),
    JOURNAL_LAST_SEQ: Spec("gauge", (), "Seq of the last journaled event."),
    JOURNAL_APPEND: Spec("histogram", (), "Seconds per journal append (one write of a loop turn's events)."),
    JOURNAL_FSYNC: Spec("histogram", (), "Seconds per journal fsync."),
    GROUP_LAG: Spec("gauge", ("group",), "Events of the group not acked yet (at least this many)."),
    PARTITION_LAG: Spec("gauge", ("group", "partition"), "Events of the partition not acked yet."),
    PARTITION_CURSOR: Spec("gauge", ("group", "partition"), "Seq the partition's members acked up to."),
    FETCHES: Spec("counter", ("group",), "Catch-up fetches the router served from the journal."),
    DEAD_LETTERS: Spec("gauge", ("group",), "Dead letters stored now."),
    PRODUCERS: Spec("gauge", (), "Connections on the router's ingest and confirm sockets."),
    LOOP_LAG: Spec("histogram", (), "Seconds the router loop's periodic tick ran late."),
    STORAGE_OK: Spec("gauge", (), "1 while the journal and cursors are writable, 0 on a storage error."),
    NATS_LEADER: Spec("gauge", (), "Engine nats: 1 while the events stream has a leader, 0 without (no writes)."),
    NATS_REPLICAS_CURRENT: Spec(
        "gauge", (), "Engine nats: copies of the events stream that are current (the leader counts as one)."
    ),
    NATS_CONSUMER_LAG: Spec(
        "gauge",
        ("group", "partition"),
        "Engine nats: events of the partition not acked yet (its consumer's pending and unacked).",
    ),
    HANDLER_DURATION: Spec("histogram", GM, "Seconds per handler call."),
    OUTCOMES: Spec(
        "counter",
        (*GM, "outcome"),
        "Handler calls by outcome: ok, retried, dead_lettered, timed_out (also counted as retried or dead_lettered).",
    ),
    EVENT_LATENCY: Spec("histogram", GM, "Seconds from the event's time (set by its producer) to its handler's start."),
    REDELIVERIES: Spec("counter", GM, "Events handed to the handler with ctx.redelivered set."),
    GAP_REPAIRS: Spec("counter", GM, "Gaps in a live partition stream repaired by a fetch."),
    BREAKER: Spec("gauge", GM, "Circuit breaker: 0 closed, 1 half-open, 2 open."),
    PROCESS_UP: Spec("gauge", ("name", "role", "group"), "1 while the launched process runs."),
    PROCESS_RESTARTS: Spec("counter", ("name", "role", "group"), "Restarts of the launched process."),
    MEMBERS_DESIRED: Spec("gauge", ("group",), "Members the launcher keeps for the group."),
    MEMBERS: Spec("gauge", ("group",), "Members of the group running now."),
    READY: Spec("gauge", (), "1 when the launcher reports the pipeline ready."),
    AUTOSCALE_DECISIONS: Spec("counter", ("group", "direction"), "Autoscaler decisions, direction up or down."),
    GW_REQUESTS: Spec("counter", ("route", "code"), "Gateway requests (a stream: its upgrade) by route and code."),
    GW_EVENTS: Spec(
        "counter",
        ("outcome",),
        "Gateway events by outcome: accepted, rejected, duplicate (accepted before), pending (no verdict yet).",
    ),
    GW_AUTH_REFUSED: Spec("counter", ("code",), "Gateway requests refused: 401 no or bad token, 403 forbidden."),
    GW_UNSETTLED: Spec("gauge", (), "Events the gateway sent the router and has no verdict for yet."),
    GW_STREAMS: Spec("gauge", (), "Open /v1/stream connections."),
}
