"""Small state files (nexus/common/statefile.py) and their users: cursors, IMAP positions,
the router's start on a damaged cursor file; plus the SDK's input checks (issue 10 #12)."""

from __future__ import annotations

import os
from pathlib import Path

import msgspec
import pytest
import structlog

from nexus import config
from nexus.common import statefile
from nexus.errors import EventError
from nexus.producer.client import _EventMaker
from nexus.protocol.events import TYPE_RE, printable
from nexus.router.cursors import CursorStore
from nexus.sources.imap_state import ImapState


def damage(path, at: int | None = None) -> None:
    data = bytearray(open(path, "rb").read())
    data[len(data) // 2 if at is None else at] ^= 0x01
    with open(path, "wb") as f:
        f.write(bytes(data))


def parse(body: bytes) -> dict:
    return msgspec.json.decode(body)


# -- statefile ----------------------------------------------------------------------------
def test_round_trip_and_previous_copy(tmp_path, fsyncs):
    path = str(tmp_path / "s" / "state")
    statefile.write(path, b'{"n": 1}')
    assert not os.path.exists(f"{path}.prev")
    statefile.write(path, b'{"n": 2}')
    assert statefile.read(path, parse) == ({"n": 2}, "", "")
    assert statefile.read(f"{path}.prev", parse).value == {"n": 1}
    assert not os.path.exists(f"{path}.tmp")
    assert len(fsyncs) == 4  # file and directory, per write


def test_missing_file_is_no_state_and_not_damage(tmp_path):
    assert statefile.read(str(tmp_path / "none"), parse) == (None, "", "")


@pytest.mark.parametrize("where", ["header", "body", "truncated"])
def test_damaged_file_falls_back_to_the_previous_copy_and_is_reported(tmp_path, where):
    path = str(tmp_path / "state")
    statefile.write(path, b'{"n": 1}')
    statefile.write(path, b'{"n": 2}')
    if where == "truncated":
        os.truncate(path, os.path.getsize(path) - 1)
    else:
        damage(path, 6 if where == "header" else None)
    with structlog.testing.capture_logs() as logs:
        loaded = statefile.read(path, parse)
    assert loaded.value == {"n": 1} and loaded.recovered_from == "previous" and loaded.damaged
    assert [e["event"] for e in logs] == ["state_file_damaged"]
    assert os.path.exists(f"{path}.damaged") and not os.path.exists(path)
    statefile.write(path, b'{"n": 3}')  # the damaged file never becomes the previous copy
    assert statefile.read(path, parse).value == {"n": 3}
    assert statefile.read(f"{path}.prev", parse).value == {"n": 1}


def test_damaged_file_and_previous_copy_recover_nothing(tmp_path):
    path = str(tmp_path / "state")
    statefile.write(path, b'{"n": 1}')
    statefile.write(path, b'{"n": 2}')
    damage(path)
    damage(f"{path}.prev")
    loaded = statefile.read(path, parse)
    assert loaded.value is None and loaded.recovered_from == "nothing" and loaded.damaged


def test_missing_file_with_a_previous_copy_is_damage(tmp_path):
    path = str(tmp_path / "state")
    statefile.write(path, b'{"n": 1}')
    statefile.write(path, b'{"n": 2}')
    os.unlink(path)
    loaded = statefile.read(path, parse)
    assert loaded.value == {"n": 1} and loaded.recovered_from == "previous"


def test_a_parser_error_is_damage(tmp_path):
    path = str(tmp_path / "state")
    statefile.write(path, b"not json")
    loaded = statefile.read(path, parse)
    assert loaded.value is None and loaded.damaged.startswith("DecodeError")


# -- cursors ----------------------------------------------------------------------------------
def test_cursor_file_in_the_old_format_still_loads(tmp_path):
    path = tmp_path / "cursors.msgpack"
    path.write_bytes(msgspec.msgpack.encode({"g": [3, 4]}))  # before statefile: bare msgpack
    store = CursorStore(str(path))
    assert store.load() == {"g": [3, 4]} and not store.lost
    store.save({"g": [5, 6]})
    assert CursorStore(str(path)).load() == {"g": [5, 6]}
    assert statefile.decode(path.read_bytes()) == msgspec.msgpack.encode({"g": [5, 6]})


def test_damaged_old_format_cursor_file_is_reported(tmp_path):
    path = tmp_path / "cursors.msgpack"
    path.write_bytes(msgspec.msgpack.encode({"g": [3, 4]})[:-1])
    store = CursorStore(str(path))
    assert store.load() == {} and store.lost
    assert store.damage["recovered_from"] == "nothing"


def router_after_damage(tmp_path, config_factory, both: bool):
    from nexus.protocol.events import Event, encode
    from nexus.router.journal import Entry, entry_encoder
    from nexus.router.server import Router

    group = {"handler": "recorder:record", "subscribe": ["test.*"], "start": "latest", "partitions": 2}
    path = config_factory(workers={"old": {**group, "start": "earliest"}})
    r = Router(config.load(path))
    r.recover()
    event = encode(Event("test.x", "s", {}, "id", 1.0))
    r.journal.append([entry_encoder.encode(Entry("test.x", 0, "", 0, msgspec.Raw(event)))] * 10)
    r.coordinator.groups["old"].cursors[:] = [7, 9]
    r.cursors.save(r.coordinator.cursor_snapshot())
    r.coordinator.groups["old"].cursors[:] = [8, 9]
    r.cursors.save(r.coordinator.cursor_snapshot())
    r.journal.close()
    damage(r.cursors.path)
    if both:
        damage(f"{r.cursors.path}.prev")
    path = config_factory(workers={"old": {**group, "start": "earliest"}, "new": group})
    r2 = Router(config.load(path))
    r2.recover()
    r2.journal.close()
    assert r2.journal.last_seq == 10
    return r2


@pytest.mark.parametrize("both", [False, True])
def test_router_resumes_groups_of_a_damaged_cursor_file_from_a_safe_point(tmp_path, config_factory, both):
    r = router_after_damage(tmp_path, config_factory, both)
    groups = r.coordinator.groups
    assert groups["old"].cursors == ([0, 0] if both else [7, 9])  # the previous copy, else the journal start
    assert groups["new"].cursors == [0, 0]  # `start: latest` is not trusted now
    assert r.cursors.damage["recovered_from"] == ("nothing" if both else "previous")


# -- IMAP positions ---------------------------------------------------------------------------------
def test_imap_state_keeps_positions_and_reports_a_lost_one(tmp_path):
    state = ImapState(tmp_path, "work")
    state.set("INBOX", 7, 10)
    state.set("Sent", 7, 3)
    state.set("INBOX", 7, 12)
    assert ImapState(tmp_path, "work").get("INBOX").last_uid == 12
    damage(state.path)
    again = ImapState(tmp_path, "work")
    assert again.damaged and again.get("INBOX").last_uid == 10  # the previous copy
    assert not again.lost("INBOX") and again.lost("Archive")  # never seen: from its start
    damage(f"{state.path}.prev")
    os.replace(f"{state.path}.damaged", state.path)
    lost = ImapState(tmp_path, "work")
    assert lost.get("INBOX") is None and lost.lost("INBOX")


def test_imap_state_in_the_old_json_format_still_loads(tmp_path):
    path = tmp_path / "imap" / "work.json"
    path.parent.mkdir()
    path.write_text('{"version": 1, "mailboxes": {"INBOX": {"uidvalidity": 5, "last_uid": 42}}}')
    state = ImapState(tmp_path, "work")
    assert state.get("INBOX").last_uid == 42 and not state.damaged and not state.lost("INBOX")


# -- issue 10 #12 at the SDK ----------------------------------------------------------------------------
@pytest.mark.parametrize("char", ["\x00", "\n", "\x1b", "\x7f", "\x9b"])
def test_sdk_refuses_control_characters(char):
    maker = _EventMaker("src", 2**20)
    with pytest.raises(EventError, match="key"):
        maker.make("test.x", {}, f"k{char}", 5, None, 1, None)
    with pytest.raises(EventError, match="correlation_id"):
        maker.make("test.x", {}, None, 5, f"c{char}", 1, None)
    with pytest.raises(EventError, match="source"):
        _EventMaker(f"s{char}", 2**20)
    maker.make("test.x", {}, "ключ", 5, "corr", 1, None)


def test_type_pattern_matches_the_whole_string():
    assert TYPE_RE.match("demo.x") and not TYPE_RE.match("demo.x\n")
    with pytest.raises(EventError, match="dotted lowercase"):
        _EventMaker("src", 2**20).make("demo.x\n", {}, None, 5, None, 1, None)
    with pytest.raises(ValueError):
        from nexus.protocol.events import contract

        contract("demo.y\n")


def test_printable_escapes_only_control_characters():
    assert printable("plain café ☕") == "plain café ☕"
    assert printable("a\x1b[2J\nb\x9b\x7f\x00") == "a\\x1b[2J\\nb\\x9b\\x7f\\x00"


def test_journal_verify_reads_a_damaged_cursor_file_without_moving_it(tmp_path, config_factory, capsys):
    """Review #18: `nexus journal verify` (safe beside a live router) loaded the cursors
    the owner's way, which renames a damaged file to .damaged under the running router.
    A reader that does not own the file changes nothing and reports the damage."""
    import argparse

    from nexus.cli.commands import cmd_journal_verify
    from nexus.router.journal import Journal

    cfg = config.load(config_factory())
    j = Journal(os.path.join(cfg.data_dir, "journal"), fsync="never")
    j.open()
    j.close()
    path = os.path.join(cfg.data_dir, "cursors.msgpack")
    store = CursorStore(path)
    store.save({"g": [1, 2]})
    store.save({"g": [3, 4]})
    damage(path)
    before = Path(path).read_bytes()
    cmd_journal_verify(cfg, argparse.Namespace(json=False))
    assert Path(path).read_bytes() == before and not os.path.exists(f"{path}.damaged")
    assert "cursor file damaged" in capsys.readouterr().out
    loaded = statefile.read(path, msgspec.msgpack.decode, quarantine=False)
    assert loaded.value == {"g": [1, 2]} and loaded.damaged and loaded.recovered_from == "previous"
    assert Path(path).read_bytes() == before
