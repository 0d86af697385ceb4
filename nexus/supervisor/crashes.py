"""The launcher's crash accounting: which event a member died (or hung) on, and when an
event has done so often enough to be dead-lettered.

On an abnormal member exit the launcher reads the member's black box: the slots still
name the events its handlers were running (nexus/common/blackbox.py). Each exit counts
against those events, per (group, seq): a crash against `max_crashes`, a handler
timeout (ExitCode.HANDLER_TIMEOUT) against `retry.attempts`. An event that reaches its
limit is poison: `MemberExited.poison` tells the router to dead-letter it and to have
the group's next owner pass over it. The router also frees the member's partitions at
once, so the other keys keep flowing while the member restarts.

An exit explained by an event (the box named one) does not count towards the
launcher's crash loop: it is bounded by `max_crashes` per event instead, so one poison
event can never make a group's members `failed`.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import structlog

from nexus.errors import ExitCode, NexusError, describe_exit
from nexus.protocol.client import CoordClient
from nexus.protocol.curve import client_keys
from nexus.protocol.wire import MemberExited

if TYPE_CHECKING:
    from nexus.config import Config

log = structlog.get_logger("nexus.launch")

MAX_TRACKED = 10_000  # (group, seq) counts kept; the oldest are forgotten beyond it
NOTIFY_TIMEOUT = 0.5  # seconds the launcher waits for the router's answer (it answers at once, or is down)


class CrashBook:
    def __init__(self, cfg: Config):
        self.cfg = cfg
        self.crashes: dict[tuple[str, int], int] = {}
        self.timeouts: dict[tuple[str, int], int] = {}
        self.dead_lettered = 0
        self.last_exit: dict[str, str] = {}  # member -> why it last ended (for `nexus status`)

    def _book(self, group: str, timeout: bool) -> tuple[dict, int]:
        """The counts an exit goes to and their poison limit: handler timeouts against
        `retry.attempts`, other crashes against `max_crashes`."""
        spec = self.cfg.workers.get(group)
        limit = (spec.retry.attempts if timeout else spec.max_crashes) if spec is not None else 3
        return (self.timeouts if timeout else self.crashes), limit

    def assess(self, group: str, member: str, pid: int, code: int, inflight_slots, hung: bool = False) -> MemberExited:
        """Count this exit against the events the box names; build the router's notice."""
        timeout = code == ExitCode.HANDLER_TIMEOUT
        book, limit = self._book(group, timeout)
        inflight: dict[int, list[int]] = {}
        poison: dict[int, list[int]] = {}
        counts = {}
        for slot in inflight_slots:
            inflight.setdefault(slot.partition, []).append(slot.seq)
            key = (group, slot.seq)
            n = counts[slot.seq] = book.pop(key, 0) + 1  # re-inserted: the newest last
            # poison only when it was alone in flight (the router has suspects of a crash with
            # several run alone next); twice the limit regardless, so a group never spins forever
            if (n >= limit and len(inflight_slots) == 1) or n >= 2 * limit:
                poison.setdefault(slot.partition, []).append(slot.seq)
            else:
                book[key] = n
        while len(book) > MAX_TRACKED:
            del book[next(iter(book))]
        reason = "hung" if hung else "handler_timeout" if timeout else "crashed"
        how = describe_exit(code)
        self.last_exit[member] = (
            f"{reason} ({how}) on seq {', '.join(map(str, sorted(counts)))}"
            + (f", dead-lettered {sorted(s for v in poison.values() for s in v)}" if poison else "")
            if counts
            else f"{reason} ({how}), no event in flight"
        )
        # a config error (exit 3) is not a crash: the launcher logs the member's one-line reason
        if code != ExitCode.CONFIG or counts:
            log.error(
                "member_crashed",
                group=group,
                member=member,
                pid=pid,
                how=how,
                reason=reason,
                seqs=sorted(counts),
                counts=counts or None,
                dead_letter=sorted(s for seqs in poison.values() for s in seqs) or None,
                why=None if counts else "no event in flight (not caused by a handler call)",
            )
        return MemberExited(
            group=group, member=member, exit_code=code, reason=reason, inflight=inflight, poison=poison, pid=pid
        )

    def notify(self, msg: MemberExited, tell: bool = True) -> bool:
        """Tell the router (it frees the partitions and dead-letters the poison). If it
        does not answer (or is not running: `tell` False, no request), the poison counts
        are kept one short of the limit, so the next crash on the event names it again."""
        told = False
        if tell:
            try:
                CoordClient(self.cfg.coord, NOTIFY_TIMEOUT, curve=client_keys(self.cfg)).member_exited(msg)
                told = True
            except NexusError:  # no answer, or refused
                pass
        if told:
            self.dead_lettered += sum(len(s) for s in msg.poison.values())
            return True
        book, limit = self._book(msg.group, msg.reason == "handler_timeout")
        for seqs in msg.poison.values():
            for seq in seqs:
                book[(msg.group, seq)] = limit - 1
        log.warning(
            "router_not_told",
            group=msg.group,
            member=msg.member,
            reason="router did not answer; its heartbeat timeout will free the partitions",
        )
        return False

    def on_exit(
        self, group: str, member: str, pid: int | None, code: int, box, hung: bool = False, tell: bool = True
    ) -> bool:
        """An abnormal member exit: count, log, tell the router. True when the box named
        the event(s) it died on (the crash is then bounded per event, not per process)."""
        slots = box.inflight() if box is not None else []
        msg = self.assess(group, member, pid or 0, code, slots, hung)
        self.notify(msg, tell)
        return bool(slots)
