"""The metric names of the pipeline's /metrics (the contract of issue 13), by type, in one
place: tests/unit/test_deploy.py checks that every name the Grafana dashboard
(deploy/grafana/nexus-dashboard.json) queries is one of these. The exposition tests
check the same list against what /metrics really serves."""

from __future__ import annotations

COUNTERS = {
    "nexus_events_accepted_total": ("type", "source"),
    "nexus_events_rejected_total": ("reason", "type", "source"),
    "nexus_duplicates_dropped_total": ("stage",),
    "nexus_fetches_total": ("group",),
    "nexus_handler_outcomes_total": ("group", "member", "outcome"),
    "nexus_redeliveries_total": ("group", "member"),
    "nexus_gap_repairs_total": ("group", "member"),
    "nexus_process_restarts_total": ("name", "role", "group"),
    "nexus_autoscale_decisions_total": ("group", "direction"),
}
GAUGES = {
    "nexus_journal_bytes": (),
    "nexus_journal_segments": (),
    "nexus_journal_last_seq": (),
    "nexus_group_lag_events": ("group",),
    "nexus_partition_lag_events": ("group", "partition"),
    "nexus_partition_cursor": ("group", "partition"),
    "nexus_dead_letters": ("group",),
    "nexus_producers_connected": (),
    "nexus_storage_ok": (),
    "nexus_breaker_state": ("group", "member"),
    "nexus_process_up": ("name", "role", "group"),
    "nexus_group_members_desired": ("group",),
    "nexus_group_members": ("group",),
    "nexus_ready": (),
}
HISTOGRAMS = {
    "nexus_journal_append_seconds": (),
    "nexus_journal_fsync_seconds": (),
    "nexus_router_loop_lag_seconds": (),
    "nexus_handler_duration_seconds": ("group", "member"),
    "nexus_event_latency_seconds": ("group", "member"),
}
METRICS = {**COUNTERS, **GAUGES, **HISTOGRAMS}  # name -> its labels


def series_names() -> set[str]:
    """Every name a Prometheus query may use: histograms as _bucket, _sum and _count."""
    names = set(COUNTERS) | set(GAUGES)
    for name in HISTOGRAMS:
        names |= {f"{name}_bucket", f"{name}_sum", f"{name}_count"}
    return names
