"""The gateway's ledger (nexus/gateway/ledger.py): what survives a gateway restart."""

from __future__ import annotations

import os
import stat

from nexus.gateway import ledger as ledger_mod
from nexus.gateway.ledger import Ledger, Unsettled


def test_producer_id_seqs_accepted_ids_and_unsettled_survive_a_restart(tmp_path):
    folder = str(tmp_path / "gw")
    a = Ledger(folder)
    pid = a.producer_id
    a.sent([Unsettled(1, "e1", b"one"), Unsettled(2, "e2", b"two"), Unsettled(3, "e3", b"three")])
    a.next_pseq = 4
    done = a.settled(2, [2])  # e1 journaled, e2 NACKed, e3 not answered yet
    assert [u.event_id for u in done] == ["e1", "e2"]
    a.close()  # (a SIGKILL: nothing more is written)

    b = Ledger(folder)
    assert b.producer_id == pid and b.next_pseq == 4
    assert "e1" in b.accepted and "e2" not in b.accepted  # a NACKed id may be sent again
    assert [(u.pseq, u.event_id, u.data) for u in b.unsettled.values()] == [(3, "e3", b"three")]
    assert stat.S_IMODE(os.stat(folder).st_mode) == 0o700
    assert stat.S_IMODE(os.stat(b.path).st_mode) == 0o600
    b.close()


def test_a_torn_tail_is_dropped(tmp_path):
    folder = str(tmp_path / "gw")
    a = Ledger(folder)
    a.sent([Unsettled(1, "e1", b"one")])
    a.settled(1, [])
    a.sent([Unsettled(2, "e2", b"two")])
    a.close()
    with open(a.path, "r+b") as f:  # the last write cut short (a host crash mid-write)
        f.truncate(os.path.getsize(a.path) - 3)
    b = Ledger(folder)
    assert "e1" in b.accepted and not b.unsettled
    b.close()


def test_renumbered_events_replace_their_old_seqs(tmp_path):
    folder = str(tmp_path / "gw")
    a = Ledger(folder)
    a.sent([Unsettled(7, "e7", b"x"), Unsettled(8, "e8", b"y")])
    a.dropped([7, 8])
    a.sent([Unsettled(3, "e7", b"x"), Unsettled(4, "e8", b"y")])
    a.close()
    b = Ledger(folder)
    assert [(u.pseq, u.event_id) for u in b.unsettled.values()] == [(3, "e7"), (4, "e8")]
    b.close()


def test_the_window_forgets_the_oldest_ids(tmp_path, monkeypatch):
    monkeypatch.setattr(ledger_mod, "DEDUP_WINDOW", 3)
    folder = str(tmp_path / "gw")
    a = Ledger(folder)
    for i in range(1, 6):
        a.sent([Unsettled(i, f"e{i}", b"")])
        a.settled(i, [])
    assert list(a.accepted) == ["e3", "e4", "e5"]
    a.close()
    b = Ledger(folder)
    assert list(b.accepted) == ["e3", "e4", "e5"]
    b.close()


FULL_DISK = """
import os, resource, signal, sys
sys.path.insert(0, {repo!r})
from nexus.gateway.ledger import Ledger, Unsettled
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # past the limit a write fails (EFBIG), as on a full disk
ledger = Ledger(sys.argv[1])
size = os.path.getsize(ledger.path)
resource.setrlimit(resource.RLIMIT_FSIZE, (size + 2000, resource.RLIM_INFINITY))
ledger.sent([Unsettled(1, "t\\x1fsmall", b"x" * 100)])
try:
    ledger.sent([Unsettled(2, "t\\x1fbig", b"y" * 10_000)])  # partly written, then refused
except OSError as exc:
    print("refused", exc.errno, sorted(ledger.unsettled), os.path.getsize(ledger.path) <= size + 2000)
ledger.sent([Unsettled(2, "t\\x1fnext", b"z" * 100)])  # the disk has room again for a small one
"""


def test_a_full_disk_refuses_the_batch_and_keeps_the_ledger_readable(tmp_path):
    """A write that fails part-way (a full disk; here the file size limit, the same EFBIG /
    ENOSPC from the kernel) records nothing: the partial bytes are cut off again, the batch
    is not unsettled (the gateway refuses it retryably), and the records after it read."""
    import subprocess
    import sys
    from pathlib import Path

    repo = str(Path(__file__).resolve().parents[2])
    folder = str(tmp_path / "gw")
    out = subprocess.run(
        [sys.executable, "-c", FULL_DISK.format(repo=repo), folder], capture_output=True, text=True, timeout=60
    )
    assert out.returncode == 0, out.stderr
    word, code, unsettled, within = out.stdout.split()
    # a short write (ENOSPC, said by _append) or the kernel's EFBIG; only the small one stays
    assert (word, int(code), unsettled, within) in {("refused", 28, "[1]", "True"), ("refused", 27, "[1]", "True")}
    again = Ledger(folder)  # what a restarted gateway reads
    assert [(u.pseq, u.event_id) for u in again.unsettled.values()] == [(1, "t\x1fsmall"), (2, "t\x1fnext")]
    again.close()
