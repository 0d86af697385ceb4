"""Private files whatever the umask (nexus/common/private.py and its users), on real files."""

from __future__ import annotations

import os
import stat

import pytest

from nexus.common import blackbox, private, statefile
from nexus.errors import ConfigError
from nexus.router.deadletters import DeadLetterStore


def mode(path) -> int:
    return stat.S_IMODE(os.lstat(path).st_mode)


@pytest.fixture
def open_umask():
    """The loosest umask: every mode below is Nexus's own doing."""
    old = os.umask(0)
    yield
    os.umask(old)


def test_state_files_folders_and_boxes_are_private(tmp_path, open_umask):
    statefile.write(str(tmp_path / "a" / "b" / "cursors"), b"x")
    statefile.write(str(tmp_path / "a" / "b" / "cursors"), b"y")  # and the .prev it keeps
    assert mode(tmp_path / "a") == mode(tmp_path / "a" / "b") == 0o700
    assert mode(tmp_path / "a" / "b" / "cursors") == mode(tmp_path / "a" / "b" / "cursors.prev") == 0o600
    box = blackbox.BlackBox.create(str(tmp_path / "run" / "box" / "m.box"))
    box.close()
    assert mode(tmp_path / "run" / "box" / "m.box") == 0o600 and mode(tmp_path / "run" / "box") == 0o700
    assert blackbox.leave_reason(str(tmp_path), "m", "why")
    assert mode(blackbox.reason_path(str(tmp_path), "m")) == 0o600


def test_an_existing_loose_file_is_made_private_when_rewritten(tmp_path, open_umask):
    path = tmp_path / "status.json.tmp"
    path.write_text("old")
    path.chmod(0o644)
    os.close(private.create(str(path)))
    assert mode(path) == 0o600


def test_dead_letter_database_and_its_wal_and_shm(tmp_path, open_umask):
    store = DeadLetterStore(str(tmp_path / "dlq" / "dlq.sqlite3"))
    try:
        names = sorted(os.listdir(tmp_path / "dlq"))
        assert names == ["dlq.sqlite3", "dlq.sqlite3-shm", "dlq.sqlite3-wal"], names
        assert {n: mode(tmp_path / "dlq" / n) for n in names} == dict.fromkeys(names, 0o600)
    finally:
        store.db.close()


@pytest.mark.parametrize("loose", [0o777, 0o775, 0o757, 0o722])
def test_a_data_dir_others_can_write_is_refused(tmp_path, loose):
    tmp_path.chmod(loose)
    with pytest.raises(ConfigError, match=rf"writable by others \(mode {loose:04o}\)"):
        private.check_data_dir(str(tmp_path), None)


def test_group_writable_is_fine_for_the_configured_group_only(tmp_path):
    import grp

    group = grp.getgrgid(os.getegid()).gr_name
    tmp_path.chmod(0o770)
    private.check_data_dir(str(tmp_path), group)
    with pytest.raises(ConfigError):
        private.check_data_dir(str(tmp_path), None)


def test_a_missing_data_dir_passes_and_a_file_does_not(tmp_path):
    private.check_data_dir(str(tmp_path / "new"), None)
    (tmp_path / "f").write_text("")
    with pytest.raises(ConfigError, match="is not a directory"):
        private.check_data_dir(str(tmp_path / "f"), None)


def test_tighten_walks_the_tree_and_leaves_symlinks_and_sockets(tmp_path):
    import socket

    data = tmp_path / "var"
    (data / "journal").mkdir(parents=True)
    (data / "journal" / "0.seg").write_bytes(b"")
    outside = tmp_path / "outside.txt"
    outside.write_text("")
    outside.chmod(0o644)
    (data / "link").symlink_to(outside)
    sock = socket.socket(socket.AF_UNIX)
    sock.bind(str(data / "s"))
    os.chmod(data / "s", 0o755)
    for p, m in ((data, 0o755), (data / "journal", 0o775), (data / "journal" / "0.seg", 0o644)):
        p.chmod(m)
    try:
        assert private.tighten(str(data), None) == 3
        assert private.tighten(str(data), None) == 0
    finally:
        sock.close()
    assert (mode(data), mode(data / "journal"), mode(data / "journal" / "0.seg")) == (0o700, 0o700, 0o600)
    assert mode(outside) == 0o644  # a symlink's target is not ours to change
