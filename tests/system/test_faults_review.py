"""System tests for review findings of issue 10 that need real processes (see
tests/unit/test_review.py for the rest)."""

from __future__ import annotations

import pytest
from test_faults import Sender, report, wait_all_handled
from test_faults_member import dead_letters, duplicates, group, send_poison

from nexus import config
from nexus.testing import wait_for

pytestmark = pytest.mark.system


# -- finding 7: events in flight with an async poison are not dead-lettered with it ----------------
def test_f7_async_poison_is_dead_lettered_alone(tmp_path, config_factory, launched):
    out = tmp_path / "rec"
    # every event runs 0.5 s: the events in flight with the poison are still running at each crash
    path = config_factory(
        workers={
            "rec": group(
                out,
                "misbehave:exits_async",
                processes=1,
                concurrency=8,
                partitions=8,
                max_crashes=3,
                options={"out": str(out), "slow": 0.5},
            )
        }
    )
    cfg = config.load(path)
    p = launched(path)
    sender = Sender(cfg.confirm, 120, chunk=20, pace=0.05)
    sender.start()
    wait_for(lambda: len(sender.acked) >= 20, 60, message="20 acked")
    poison_id = send_poison(cfg)
    sender.join(120)
    assert sender.error is None and len(sender.acked) == 120
    rows = wait_for(
        lambda: [r for r in dead_letters(cfg, "rec") if r["event_id"] == poison_id],
        90,
        0.2,
        "the poison event dead-lettered",
    )
    letters = dead_letters(cfg, "rec")
    innocent = len(letters) - len(rows)
    if innocent:
        report(
            "async_poison_alone",
            sent=121,
            acked=len(sender.acked) + 1,
            dead_lettered=len(letters),
            innocent_dead_lettered=innocent,
        )
    assert [r["event_id"] for r in letters] == [poison_id], "innocent events dead-lettered with the poison"
    handled = wait_all_handled(out, sender.acked, 120)
    flagged, unflagged = duplicates(out)
    log = p.output()
    report(
        "async_poison_alone",
        sent=121,
        acked=len(sender.acked) + 1,
        delivered_rec=len(handled),
        lost=len(set(sender.acked) - set(handled)),
        dead_lettered=len(letters),
        innocent_dead_lettered=innocent,
        crashes=log.count("member_crashed"),
        dup_flagged=flagged,
        dup_unflagged=unflagged,
    )
    assert set(sender.acked) <= set(handled) and poison_id not in handled
    assert "suspect_running_alone" in log
    assert unflagged == 0
