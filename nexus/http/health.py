"""The health verdict, as pure functions of the two status replies: the launcher's
(`ControlClient.status()`) and the router's (`CoordClient.status()`), None for a peer
that did not answer. /healthz, /readyz and `nexus status` all use these, so they
always agree.

- live: the launcher and the router answer (a supervisor or a load balancer restarts
  the pipeline when this fails).
- ready: live, the router has read its journal, its storage is writable, and every
  group that wants members has every partition assigned (traffic can flow).
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
    groups = router.get("groups", {})
    wanted = desired_members(launcher) if launcher is not None else {}
    for name, n in sorted(wanted.items()):
        if n <= 0:
            continue
        g = groups.get(name)
        if g is None:
            reasons.append(f"group {name}: unknown to the router")
        elif g.get("unassigned", 0):
            reasons.append(
                f"group {name}: {g['unassigned']} of {g['partitions']} partitions unassigned "
                f"({len(g.get('members', []))} of {n} members joined)"
            )
    return not reasons, reasons


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
