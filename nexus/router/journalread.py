"""The `Read` coord request: journal events by position and type glob, for live
consumers that are not group members (the gateway's /v1/subscribe).

It runs in the router loop, so it is bounded like a member's fetch: events and bytes per
reply, and the records and bytes one request may examine; the consumer asks again from
`upto`. The type filter runs here (a journal entry carries its type, so a record of
another type is passed over without decoding its event).
"""

from __future__ import annotations

import fnmatch

import msgspec

from nexus.protocol.wire import Journaled, Read
from nexus.router.journal import Journal, entry_decoder

SCAN_RECORDS = 50_000  # records one Read examines at most (at least 50 per event asked)
SCAN_BYTES = 64 * 2**20  # journal bytes one Read examines at most


def read(journal: Journal, msg: Read, fetch_limit: int, fetch_bytes: int) -> Journaled:
    first, last = journal.first_seq(), journal.last_seq
    after = max(0, msg.after)
    limit = max(0, min(msg.limit, fetch_limit))
    if limit == 0 or after >= last:
        return Journaled(after=after, upto=after, first=first, last=last)
    max_bytes = msg.max_bytes if msg.max_bytes > 0 else fetch_bytes
    globs = list(msg.types)
    matches: dict[str, bool] = {}  # per type: one fnmatch per type, not per record
    decode = entry_decoder.decode

    def want(body):
        entry = decode(body)
        if entry.group:  # re-journaled for one group (a dead-letter replay): seen already
            return None
        ok = matches.get(entry.type)
        if ok is None:
            ok = matches[entry.type] = not globs or any(fnmatch.fnmatchcase(entry.type, g) for g in globs)
        if not ok:
            return None
        # a view into the read chunk is copied out (the reply must not hold the chunk)
        return entry.event if type(body) is bytes else entry.event.copy()

    records = journal.read(
        after,
        limit,
        max_bytes=max_bytes,
        want=want,
        max_scan=(max(limit * 50, SCAN_RECORDS), max(SCAN_BYTES, 2 * max_bytes)),
    )
    # a CRC-valid body that does not decode (never written so by a router) is left out
    records = [(seq, ev) for seq, ev in records if type(ev) is msgspec.Raw]
    upto = max(min(journal.read_upto, last), after)
    if not records and upto == after:
        upto = last  # nothing readable after it
    return Journaled(
        after=after,
        upto=upto,
        first=first,
        last=last,
        seqs=[seq for seq, _ in records],
        events=[ev for _, ev in records],
    )
