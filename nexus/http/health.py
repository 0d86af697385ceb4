"""The health verdict, as pure functions of the two status replies: the launcher's
(`ControlClient.status()`) and the router's (`CoordClient.status()`), None for a peer
that did not answer. /healthz, /readyz and `nexus status` all use these, so they
always agree.

- live: the launcher and the router answer (a supervisor or a load balancer restarts
  the pipeline when this fails).
- ready: live, the router has read its journal, its storage is writable, and every
  group the router knows has every partition assigned (traffic can flow), whoever runs
  its members: this launcher, or `nexus worker` in other containers or hosts (a group
  with `processes: 0` here). The one exception is a group the autoscaler scaled to zero
  (`autoscale.min: 0`, nothing to do): its events wait in the journal by design.
  Under `engine: nats` the ingest process answers for the router, with an `engine`
  section: not ready while the cluster does not answer it or the stream has no leader
  (no event can be stored); unowned partitions count as unassigned ones.
"""

from __future__ import annotations

from typing import Any

Status = dict[str, Any] | None
JOURNAL_PARTS = ("journal", "fsync")  # storage parts that mean the journal cannot take writes


def liveness(launcher: Status, router: Status) -> tuple[bool, list[str]]:
    reasons = []
    if launcher is None:
        reasons.append("launcher not answering")
    if router is None:
        reasons.append("router not answering")
    return not reasons, reasons


def desired_members(launcher: dict[str, Any]) -> dict[str, int]:
    """Members wanted per group: the launcher's `scale` when it reports one, else its
    worker processes that are not stopped on purpose (a failed one is still wanted)."""
    if isinstance(launcher.get("scale"), dict):
        return {g: int(n) for g, n in launcher["scale"].items()}
    wanted: dict[str, int] = {}
    for p in launcher.get("processes", []):
        if p.get("role") == "worker":
            wanted.setdefault(p["group"], 0)
            if p.get("state") != "stopped":
                wanted[p["group"]] += 1
    return wanted


def scaled_to_zero(launcher: dict[str, Any], wanted: dict[str, int]) -> set[str]:
    """Groups the autoscaler may and did take to zero members (min 0, desired 0)."""
    autoscale = launcher.get("autoscale")
    if not isinstance(autoscale, dict):
        return set()
    return {g for g, a in autoscale.items() if isinstance(a, dict) and a.get("min") == 0 and wanted.get(g, 0) == 0}


def readiness(launcher: Status, router: Status) -> tuple[bool, list[str]]:
    _, reasons = liveness(launcher, router)
    if launcher is not None:
        failed = [p for p in launcher.get("processes", []) if p.get("state") == "failed"]
        for p in failed:
            reasons.append(f"process {p['name']} failed ({p.get('last_exit') or 'given up on'})")
        if not launcher.get("ready", False) and not failed:
            reasons.append("pipeline starting (not all members have joined yet)")
    if router is None:
        return False, reasons
    r = router.get("router", {})
    if r.get("recovering"):
        reasons.append(f"router recovering its journal ({r.get('recovered_records', 0)} records read)")
    storage = r.get("storage", {})
    for part, error in sorted(storage.get("failing", {}).items()):
        what = "journal not writable" if part in JOURNAL_PARTS else "storage error"
        reasons.append(f"{what} ({part}: {error})")
    if storage.get("state", "ok") != "ok" and not storage.get("failing"):
        reasons.append("storage error")
    reasons += engine_reasons(router.get("engine"))
    groups = router.get("groups", {})
    wanted = desired_members(launcher) if launcher is not None else {}
    resting = scaled_to_zero(launcher, wanted) if launcher is not None else set()
    for name in sorted(set(groups) | {g for g, n in wanted.items() if n > 0}):
        g = groups.get(name)
        n = wanted.get(name, 0)
        if g is None:
            reasons.append(f"group {name}: unknown to the router")
        elif g.get("unassigned", 0) and name not in resting:
            joined = len(g.get("members", []))
            who = f"{joined} of {n} members joined" if n > 0 else f"{joined} members joined, none run by this launcher"
            reasons.append(f"group {name}: {g['unassigned']} of {g['partitions']} partitions unassigned ({who})")
    return not reasons, reasons


def engine_reasons(engine: Any) -> list[str]:
    """Engine nats: the cluster as the ingest process sees it (nothing for embedded)."""
    if not isinstance(engine, dict):
        return []
    stream = engine.get("stream", "?")
    if not engine.get("reachable", False):
        return [f"nats cluster unreachable ({engine.get('error') or 'no answer'})"]
    if not engine.get("leader"):
        return [f"nats stream {stream} has no leader (no quorum: events cannot be stored)"]
    return []


def verdict(launcher: Status, router: Status) -> dict[str, Any]:
    """Both, for JSON: {"live", "ready", "reasons"} (the readiness reasons include the
    liveness ones)."""
    live, _ = liveness(launcher, router)
    ready, reasons = readiness(launcher, router)
    return {"live": live, "ready": ready, "reasons": reasons}


def verdict_line(v: dict[str, Any]) -> str:
    """One line, as `nexus status` prints it."""
    live = "live" if v["live"] else "NOT LIVE"
    ready = "ready" if v["ready"] else "NOT READY"
    line = f"health: {live}, {ready}"
    return line + (": " + "; ".join(v["reasons"]) if v["reasons"] else "")
