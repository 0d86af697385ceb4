"""The router's background flusher: journal fsync on the interval policy, cursor saves."""

from __future__ import annotations

import msgspec

from nexus.common import statefile
from nexus.router.cursors import CursorStore
from nexus.router.flusher import Flusher
from nexus.router.journal import Journal
from nexus.testing import wait_for


def make(tmp_path, policy: str, interval: float = 0.01):
    journal = Journal(str(tmp_path / "j"), fsync=policy, fsync_interval=interval)
    journal.open()
    cursors = CursorStore(str(tmp_path / "cursors.msgpack"))
    return journal, cursors, Flusher(journal, cursors, interval)


def test_interval_policy_syncs_written_records_off_thread(tmp_path, fsyncs):
    journal, cursors, flusher = make(tmp_path, "interval")
    flusher.start()
    try:
        journal.append([b"a", b"b"])
        wait_for(lambda: journal._wfd in fsyncs, 5, message="interval fsync of the journal")
        synced = fsyncs.count(journal._wfd)
        journal.append([b"c"])
        wait_for(lambda: fsyncs.count(journal._wfd) > synced, 5, message="fsync after a new append")
    finally:
        flusher.stop()
        journal.close()


def test_never_policy_does_not_sync_the_journal(tmp_path, fsyncs):
    journal, cursors, flusher = make(tmp_path, "never")
    flusher.start()
    try:
        journal.append([b"a"])
        flusher.post({"g": [1, 2]})  # the save (with its own fsync) marks a full turn
        wait_for(lambda: flusher.saved == {"g": [1, 2]}, 5, message="cursor save")
        assert journal._wfd not in fsyncs
    finally:
        flusher.stop()
        journal.close()


def test_posted_cursors_are_saved_and_the_latest_wins(tmp_path):
    journal, cursors, flusher = make(tmp_path, "never")
    flusher.post({"g": [1]})
    flusher.post({"g": [5]})  # before the thread runs: replaces the first
    flusher.start()
    try:
        wait_for(lambda: flusher.saved is not None, 5, message="cursor save")
        assert flusher.saved == {"g": [5]}
        assert CursorStore(cursors.path).load() == {"g": [5]}
    finally:
        flusher.stop()
        journal.close()


def test_an_older_snapshot_never_overwrites_a_newer_save(tmp_path):
    journal, cursors, flusher = make(tmp_path, "never")
    flusher.post({"g": [9]})  # version 1, taken by the thread...
    pending = flusher._pending
    flusher.save_now({"g": [3]})  # version 2: a replay rewound the cursors
    flusher._save(*pending)  # ...and saved after the rewind: ignored
    assert CursorStore(cursors.path).load() == {"g": [3]}
    # issue 10 #16: the file now carries a checksummed header (nexus/common/statefile.py)
    body = statefile.decode((tmp_path / "cursors.msgpack").read_bytes())
    assert msgspec.msgpack.decode(body) == {"g": [3]}
    journal.close()


def test_a_disk_error_is_back_pressure_and_retried(tmp_path, monkeypatch):
    """Issue 10 #3: a cursor save on a full disk is a storage state the router reports
    and the flusher retries; it no longer stops the router (this test asserted
    `flusher.error`, which made the router crash, before)."""
    journal, cursors, flusher = make(tmp_path, "never")
    real_save = cursors.save
    full = [True]

    def save(snapshot):
        if full[0]:
            raise OSError(28, "No space left on device")
        real_save(snapshot)

    monkeypatch.setattr(cursors, "save", save)
    flusher.start()
    try:
        flusher.post({"g": [1]})
        wait_for(lambda: not flusher.storage.ok, 5, message="storage error")
        assert "No space left" in flusher.storage.describe()["failing"]["cursors"]
        assert flusher.error is None
        full[0] = False
        wait_for(lambda: flusher.storage.ok, 10, message="storage recovered")
        assert flusher.saved == {"g": [1]} and cursors.load() == {"g": [1]}
    finally:
        flusher.stop()
        journal.close()
