"""Unit tests for nexus/protocol/events.py and the built-in contracts in nexus/contracts.py."""

from __future__ import annotations

import os
import re
import time
import types
import uuid
from typing import Annotated

import msgspec
import pytest

import nexus.contracts as builtin
from nexus.errors import EventError
from nexus.protocol.events import (
    Contract,
    Contracts,
    Event,
    WireEvent,
    contract,
    decode_wire_event,
    encode,
    new_id,
)

UUID_RE = re.compile(r"^[0-9a-f]{8}-[0-9a-f]{4}-7[0-9a-f]{3}-[89ab][0-9a-f]{3}-[0-9a-f]{12}$")


# -- new_id -------------------------------------------------------------------------
def test_new_id_is_a_uuid7_string():
    for _ in range(100):
        s = new_id()
        assert UUID_RE.match(s), s
        u = uuid.UUID(s)
        assert str(u) == s
        assert u.version == 7
        assert u.variant == uuid.RFC_4122


def test_new_id_time_prefix_is_current_millis():
    import time

    before = time.time_ns() // 1_000_000
    s = new_id()
    after = time.time_ns() // 1_000_000
    ms = int(s.replace("-", "")[:12], 16)
    # the counter may push the stamp at most a little ahead of the clock
    assert before <= ms <= after + 2


def test_new_id_unique_and_sorted_over_100k():
    ids = [new_id() for _ in range(100_000)]
    assert len(set(ids)) == len(ids)
    assert ids == sorted(ids)


def test_new_id_unique_and_sorted_per_thread_across_threads():
    import threading

    per_thread: list[list[str]] = [[] for _ in range(4)]
    start = threading.Barrier(4)

    def make(out: list[str]) -> None:
        start.wait(10)
        for _ in range(50_000):
            out.append(new_id())

    threads = [threading.Thread(target=make, args=(out,)) for out in per_thread]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
        assert not t.is_alive()
    every = [i for out in per_thread for i in out]
    assert len(set(every)) == len(every) == 200_000
    for out in per_thread:
        assert out == sorted(out)
    assert all(UUID_RE.match(i) for i in every[::997])


class FrozenClock:
    """Stands in for the `time` module of nexus.protocol.events: time_ns() returns `ns`."""

    def __init__(self, ms: int):
        self.ns = ms * 1_000_000

    def time_ns(self) -> int:
        return self.ns


@pytest.fixture
def frozen_clock(monkeypatch):
    """Freeze new_id's clock at a given ms, starting from a fresh id block; the real block
    comes back afterwards, so no faked (future) stamp leaks into later ids."""
    import itertools

    import nexus.protocol.events as events

    def freeze(ms: int) -> FrozenClock:
        clock = FrozenClock(ms)
        monkeypatch.setattr(events, "time", clock)
        monkeypatch.setattr(events, "_id_block", (0, "", itertools.count(events._COUNTER_MAX + 1)))
        return clock

    return freeze


def test_new_id_counter_overflow_borrows_the_next_millisecond(frozen_clock):
    ms = 1_900_000_000_000
    frozen_clock(ms)
    ids = [new_id() for _ in range(3 * 65_536 + 10)]  # more than one millisecond's counter
    assert len(set(ids)) == len(ids)
    assert ids == sorted(ids)
    stamps = [int(i.replace("-", "")[:12], 16) for i in ids]
    assert stamps[0] == ms and stamps[-1] == ms + 3
    assert all(UUID_RE.match(i) and uuid.UUID(i).version == 7 for i in ids[65_530:65_540])


def test_new_id_sorts_when_the_clock_steps_back(frozen_clock):
    clock = frozen_clock(1_900_000_001_000)
    ids = [new_id()]
    clock.ns -= 5_000_000_000  # NTP step: 5 s back
    ids += [new_id() for _ in range(10)]
    clock.ns += 6_000_000_000  # past the last stamp again
    ids += [new_id() for _ in range(10)]
    assert ids == sorted(ids) and len(set(ids)) == len(ids)


def test_new_id_draws_fresh_randomness_every_millisecond(frozen_clock):
    clock = frozen_clock(1_900_000_002_000)
    random_parts = set()
    for _ in range(1000):
        clock.ns += 1_000_000
        h = new_id().replace("-", "")
        random_parts.add(h[13:16] + h[17:28])  # rand_a and rand_b without variant and counter
    assert len(random_parts) == 1000  # 58 random bits: a repeat would be a bug


def test_new_id_follows_the_real_clock_again_after_a_frozen_one():
    test_new_id_time_prefix_is_current_millis()


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs os.fork")
def test_new_id_forked_child_does_not_repeat_the_parents_ids():
    import select

    parent_before = [new_id() for _ in range(1000)]
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:  # child: ids right after the fork, then exit
        try:
            os.write(w, "\n".join(new_id() for _ in range(1000)).encode())
        finally:
            os._exit(0)
    os.close(w)
    parent_after = [new_id() for _ in range(1000)]
    data = b""
    deadline = time.monotonic() + 30
    while True:
        left = deadline - time.monotonic()
        assert left > 0, "child did not answer"
        if select.select([r], [], [], left)[0]:
            chunk = os.read(r, 65536)
            if not chunk:
                break
            data += chunk
    os.close(r)
    assert os.waitpid(pid, 0)[1] == 0
    child = data.decode().split("\n")
    assert len(child) == 1000 and all(UUID_RE.match(i) for i in child)
    assert child == sorted(child)
    assert child[0] > parent_before[-1]  # the child's ids still sort after what it inherited
    assert not set(child) & set(parent_before + parent_after)


# -- contract() registration -----------------------------------------------------------
def test_contract_requires_forbid_unknown_fields():
    with pytest.raises(TypeError, match="forbid_unknown_fields"):

        @contract("unittest.lenient")
        class Lenient(msgspec.Struct):
            a: int


def test_contract_requires_a_struct():
    with pytest.raises(TypeError, match="msgspec.Struct"):

        @contract("unittest.notstruct")
        class NotStruct:
            a: int


@pytest.mark.parametrize(
    "name",
    ["Email.received", "email", "email.", ".email", "email..x", "1email.x", "email.re-ceived", "email received.x", ""],
)
def test_contract_rejects_bad_type_names(name):
    with pytest.raises(ValueError, match="dotted lowercase"):
        contract(name)


@pytest.mark.parametrize("name", ["a.b", "email.received", "x_1.y_2.z3", "a.0"])
def test_contract_accepts_good_type_names(name):
    contract(name, v=999)  # returns the decorator without registering anything yet


def test_contract_registers_and_conflicting_class_is_refused():
    @contract("unittest.reg", v=1)
    class First(Contract):
        a: int

    assert Contracts().struct_for("unittest.reg", 1) is First
    assert ("unittest.reg", 1) in Contracts().known_types()

    with pytest.raises(ValueError, match="already has contract"):

        @contract("unittest.reg", v=1)
        class Second(Contract):
            a: int

    # the same class registered again (e.g. module imported twice) is fine
    contract("unittest.reg", v=1)(First)
    assert Contracts().struct_for("unittest.reg", 1) is First


def test_contract_same_qualname_from_other_module_is_refused():
    def make(module_name):
        mod = types.ModuleType(module_name)
        exec("from nexus.protocol.events import Contract\nclass Payload(Contract):\n    a: int\n", mod.__dict__)
        return mod.Payload

    one = make("unittest_mod_one")
    two = make("unittest_mod_two")
    assert one.__qualname__ == two.__qualname__ and one.__module__ != two.__module__
    contract("unittest.qualname", v=1)(one)
    refused = False
    try:
        contract("unittest.qualname", v=1)(two)
    except ValueError:
        refused = True
    assert Contracts().struct_for("unittest.qualname", 1) is one, "registration was silently replaced"
    assert refused


# -- Contracts: convert / decode_payload / check_payload --------------------------------
@contract("unittest.thing", v=1)
class Thing(Contract):
    name: Annotated[str, msgspec.Meta(min_length=1, max_length=8)]
    count: Annotated[int, msgspec.Meta(ge=0, le=10)] = 0


@contract("unittest.thing", v=2)
class ThingV2(Contract):
    title: str


def test_convert_valid_dict_and_instance():
    c = Contracts()
    out = c.convert("unittest.thing", 1, {"name": "abc", "count": 3})
    assert out == Thing(name="abc", count=3)
    inst = Thing(name="x")
    assert c.convert("unittest.thing", 1, inst) is inst
    assert c.convert("unittest.thing", 2, {"title": "t"}) == ThingV2(title="t")


@pytest.mark.parametrize(
    "payload,needle",
    [
        ({"name": "abc", "extra": 1}, "unknown field `extra`"),
        ({"name": 5}, "Expected `str`"),
        ({"name": ""}, "length >= 1"),
        ({"name": "123456789"}, "length <= 8"),
        ({"name": "a", "count": 11}, "<= 10"),
        ({"name": "a", "count": -1}, ">= 0"),
        ({}, "missing required field `name`"),
        ([1, 2], "Expected `object`"),
    ],
)
def test_convert_rejects_invalid(payload, needle):
    with pytest.raises(EventError) as info:
        Contracts().convert("unittest.thing", 1, payload)
    assert "does not match contract unittest.thing v1" in str(info.value)
    assert needle in str(info.value)


@pytest.mark.parametrize(
    "payload,needle",
    [
        ({"name": "abc", "extra": 1}, "unknown field `extra`"),
        ({"name": 5}, "Expected `str`"),
        ({"name": "a", "count": 11}, "<= 10"),
        ("text", "Expected `object`"),
    ],
)
def test_decode_and_check_payload_reject_invalid(payload, needle):
    raw = msgspec.msgpack.encode(payload)
    c = Contracts()
    with pytest.raises(EventError, match=re.escape(needle)):
        c.decode_payload("unittest.thing", 1, raw)
    with pytest.raises(EventError, match=re.escape(needle)):
        c.check_payload("unittest.thing", 1, raw)


def test_decode_payload_valid_and_not_msgpack():
    c = Contracts()
    raw = msgspec.msgpack.encode({"name": "abc", "count": 2})
    assert c.decode_payload("unittest.thing", 1, raw) == Thing(name="abc", count=2)
    assert c.check_payload("unittest.thing", 1, raw) is None
    # decoders are cached: a second call gives the same answer
    assert c.decode_payload("unittest.thing", 1, raw) == Thing(name="abc", count=2)
    with pytest.raises(EventError, match="not valid msgpack"):
        c.decode_payload("unittest.thing", 1, b"\xc1")


def test_decode_payload_invalid_utf8_is_an_event_error():
    raw = msgspec.msgpack.encode({"name": "ABC"}).replace(b"ABC", b"A\xff\xfe")
    with pytest.raises(EventError):
        Contracts().decode_payload("unittest.thing", 1, raw)


def test_unknown_type_without_untyped_patterns():
    c = Contracts()
    raw = msgspec.msgpack.encode({"a": 1})
    for call in (
        lambda: c.convert("unittest.nope", 1, {"a": 1}),
        lambda: c.decode_payload("unittest.nope", 1, raw),
        lambda: c.check_payload("unittest.nope", 1, raw),
    ):
        with pytest.raises(EventError, match="unknown event type unittest.nope"):
            call()


def test_unknown_type_with_untyped_patterns():
    c = Contracts(untyped=["unittest.free.*", "demo.*"])
    raw = msgspec.msgpack.encode({"a": [1, 2]})
    assert c.is_untyped_allowed("unittest.free.x")
    assert c.is_untyped_allowed("demo.thing")
    assert not c.is_untyped_allowed("unittest.other")
    assert c.convert("demo.thing", 1, {"a": 1}) == {"a": 1}
    assert c.decode_payload("demo.thing", 1, raw) == {"a": [1, 2]}
    # router side keeps untyped payloads raw: not even decoded
    assert c.check_payload("demo.thing", 1, b"\xc1") is None
    with pytest.raises(EventError, match="unknown event type unittest.other"):
        c.check_payload("unittest.other", 1, raw)


def test_untyped_pattern_does_not_admit_badly_named_types():
    c = Contracts(untyped=["*"])
    assert c.is_untyped_allowed("any.thing")
    assert not c.is_untyped_allowed("Any.Thing")
    assert not c.is_untyped_allowed("nodot")
    with pytest.raises(EventError, match="not dotted lowercase"):
        c.check_payload("Any.Thing", 1, msgspec.msgpack.encode({}))


def test_wrong_version_message_lists_known_versions():
    c = Contracts()
    with pytest.raises(EventError) as info:
        c.convert("unittest.thing", 3, {"name": "a"})
    assert str(info.value) == "event type unittest.thing has no contract v3 (known: [1, 2])"
    with pytest.raises(EventError, match=re.escape("has no contract v3 (known: [1, 2])")):
        c.check_payload("unittest.thing", 3, msgspec.msgpack.encode({"name": "a"}))


def test_known_version_wins_over_untyped_pattern():
    c = Contracts(untyped=["unittest.*"])
    with pytest.raises(EventError):
        c.check_payload("unittest.thing", 1, msgspec.msgpack.encode({"bad": 1}))


# -- Event / WireEvent round trip -------------------------------------------------------
def make_event(**kw) -> Event:
    base = dict(
        type="unittest.thing", source="unit", payload=Thing(name="abc", count=1), id=new_id(), time=1700000000.5
    )
    base.update(kw)
    return Event(**base)


def test_event_wire_round_trip_with_all_fields():
    ev = make_event(key="k", priority=2, correlation_id="corr", v=1)
    data = encode(ev)
    wire = decode_wire_event(data)
    assert isinstance(wire, WireEvent)
    assert (wire.type, wire.source, wire.id, wire.time, wire.key, wire.priority, wire.correlation_id, wire.v) == (
        ev.type,
        ev.source,
        ev.id,
        ev.time,
        "k",
        2,
        "corr",
        1,
    )
    assert isinstance(wire.payload, msgspec.Raw)
    assert Contracts().decode_payload(wire.type, wire.v, bytes(wire.payload)) == ev.payload
    # and back to a full Event with the typed payload
    back = msgspec.msgpack.decode(data, type=Event)
    assert back.payload == {"name": "abc", "count": 1}
    assert back.id == ev.id and back.key == "k"


def test_event_defaults_are_omitted_and_restored():
    ev = make_event()
    decoded = msgspec.msgpack.decode(encode(ev))
    assert set(decoded) == {"type", "source", "payload", "id", "time"}
    wire = decode_wire_event(encode(ev))
    assert wire.key is None and wire.priority == 5 and wire.correlation_id is None and wire.v == 1


def test_partition_key_defaults_to_source():
    assert make_event(source="s1").partition_key == "s1"
    assert make_event(source="s1", key="k1").partition_key == "k1"
    assert make_event(source="s1", key="").partition_key == ""


@pytest.mark.parametrize(
    "field,value",
    [
        ("type", "ab"),
        ("type", "a." + "x" * 127),
        ("source", ""),
        ("source", "s" * 129),
        ("key", "k" * 257),
        ("priority", 0),
        ("priority", 11),
        ("id", ""),
        ("id", "i" * 65),
        ("v", 0),
        ("v", 1001),
        ("correlation_id", "c" * 65),
    ],
)
def test_wire_bounds_rejected(field, value):
    data = encode(make_event(**{field: value}))
    with pytest.raises(msgspec.ValidationError, match=re.escape(f"$.{field}")):
        decode_wire_event(data)


@pytest.mark.parametrize(
    "field,value",
    [
        ("type", "a.b"),
        ("type", "a." + "x" * 126),
        ("source", "s"),
        ("source", "s" * 128),
        ("key", "k" * 256),
        ("key", ""),
        ("priority", 1),
        ("priority", 10),
        ("id", "i" * 64),
    ],
)
def test_wire_bounds_accepted_at_the_edge(field, value):
    wire = decode_wire_event(encode(make_event(**{field: value})))
    assert getattr(wire, field) == value


def test_wire_missing_field_and_wrong_type():
    good = msgspec.msgpack.decode(encode(make_event()))
    for missing in ("type", "source", "payload", "id", "time"):
        bad = dict(good)
        del bad[missing]
        with pytest.raises(msgspec.ValidationError, match=f"missing required field `{missing}`"):
            decode_wire_event(msgspec.msgpack.encode(bad))
    with pytest.raises(msgspec.ValidationError):
        decode_wire_event(msgspec.msgpack.encode({**good, "time": "now"}))
    with pytest.raises(msgspec.DecodeError):
        decode_wire_event(b"\xc1garbage")


# -- built-in contracts -------------------------------------------------------------------
VALID = {
    ("file.created", 1): {"path": "/tmp/a", "watcher": "inbox", "size": 3, "mtime": 1.0},
    ("file.modified", 1): {"path": "/tmp/a", "watcher": "inbox"},
    ("file.deleted", 1): {"path": "/tmp/a", "watcher": "inbox", "is_directory": True},
    ("file.moved", 1): {"path": "/tmp/b", "src_path": "/tmp/a", "watcher": "inbox"},
    ("schedule.tick", 1): {"name": "hb", "scheduled": 1.0, "fired": 1.1, "expression": "every 10s"},
    ("email.received", 1): {
        "account": "work",
        "mailbox": "INBOX",
        "uid": 7,
        "uidvalidity": 1,
        "from": "a@b.c",
        "to": ["x@y.z"],
        "subject": "hi",
        "flags": ["\\Seen"],
    },
    ("parrot.notification", 1): {
        "app_id": "outlook",
        "app_name": "Outlook",
        "title": "t",
        "body": "b",
        "notification_type": "message",
        "received_at": 1.0,
    },
}
INVALID = {
    ("file.created", 1): {"path": "", "watcher": "inbox"},
    ("file.modified", 1): {"path": "/a", "watcher": "inbox", "size": -1},
    ("file.deleted", 1): {"path": "/a"},
    ("file.moved", 1): {"path": "/b", "watcher": "inbox"},
    ("schedule.tick", 1): {"name": "hb", "scheduled": "soon", "fired": 1.0},
    ("email.received", 1): {"account": "work", "mailbox": "INBOX", "uid": -1, "uidvalidity": 1},
    ("parrot.notification", 1): {
        "app_id": "o",
        "app_name": "O",
        "title": "t",
        "body": "b",
        "notification_type": "fax",
        "received_at": 1.0,
    },
}


def test_builtin_types_are_registered():
    known = set(Contracts().known_types())
    assert set(VALID) <= known


@pytest.mark.parametrize("key", sorted(VALID))
def test_builtin_contract_accepts_valid(key):
    c = Contracts()
    out = c.convert(*key, VALID[key])
    assert isinstance(out, c.struct_for(*key))
    raw = msgspec.msgpack.encode(VALID[key])
    assert c.decode_payload(*key, raw) == out
    c.check_payload(*key, raw)


@pytest.mark.parametrize("key", sorted(INVALID))
def test_builtin_contract_rejects_invalid(key):
    c = Contracts()
    with pytest.raises(EventError):
        c.convert(*key, INVALID[key])
    with pytest.raises(EventError):
        c.check_payload(*key, msgspec.msgpack.encode(INVALID[key]))


@pytest.mark.parametrize("key", sorted(VALID))
def test_builtin_contract_forbids_unknown_fields(key):
    with pytest.raises(EventError, match="unknown field `surprise`"):
        Contracts().convert(*key, {**VALID[key], "surprise": 1})


def test_builtin_string_bounds():
    c = Contracts()
    with pytest.raises(EventError, match="length <= 4096"):
        c.convert("file.created", 1, {"path": "p" * 4097, "watcher": "w"})
    with pytest.raises(EventError, match="length <= 8192"):
        c.convert(
            "email.received", 1, {"account": "a", "mailbox": "m", "uid": 1, "uidvalidity": 1, "snippet": "s" * 8193}
        )
    with pytest.raises(EventError, match="length <= 256"):
        c.convert("email.received", 1, {"account": "a", "mailbox": "m", "uid": 1, "uidvalidity": 1, "to": ["x"] * 257})


PARROT = {"app_id": "outlook", "app_name": "Outlook", "title": "t", "body": "b", "received_at": 1.0}
EMAIL_DATA = {"sender": "a@b.c", "subject": "s"}


def test_parrot_email_requires_email_data():
    c = Contracts()
    with pytest.raises(EventError, match="email_data is required"):
        c.convert("parrot.notification", 1, {**PARROT, "notification_type": "email"})
    with pytest.raises(EventError, match="email_data is required"):
        c.check_payload("parrot.notification", 1, msgspec.msgpack.encode({**PARROT, "notification_type": "email"}))
    ok = c.convert("parrot.notification", 1, {**PARROT, "notification_type": "email", "email_data": EMAIL_DATA})
    assert ok.email_data == builtin.ParrotEmailData(sender="a@b.c", subject="s")


@pytest.mark.parametrize("kind", ["message", "calendar", "system", "other"])
def test_parrot_email_data_only_for_email(kind):
    c = Contracts()
    assert c.convert("parrot.notification", 1, {**PARROT, "notification_type": kind}).email_data is None
    with pytest.raises(EventError, match="email_data is only allowed"):
        c.convert("parrot.notification", 1, {**PARROT, "notification_type": kind, "email_data": EMAIL_DATA})
    with pytest.raises(EventError, match="email_data is only allowed"):
        c.decode_payload(
            "parrot.notification",
            1,
            msgspec.msgpack.encode({**PARROT, "notification_type": kind, "email_data": EMAIL_DATA}),
        )


def test_parrot_email_data_is_strict():
    with pytest.raises(EventError, match="unknown field `cc`"):
        Contracts().convert(
            "parrot.notification", 1, {**PARROT, "notification_type": "email", "email_data": {**EMAIL_DATA, "cc": "x"}}
        )


def test_email_received_from_wire_name():
    c = Contracts()
    base = {"account": "a", "mailbox": "INBOX", "uid": 1, "uidvalidity": 2}
    msg = c.convert("email.received", 1, {**base, "from": "x@y.z"})
    assert msg.from_ == "x@y.z"
    encoded = msgspec.msgpack.decode(msgspec.msgpack.encode(msg))
    assert encoded["from"] == "x@y.z" and "from_" not in encoded
    # the Python attribute name is not a wire name
    with pytest.raises(EventError, match="unknown field `from_`"):
        c.convert("email.received", 1, {**base, "from_": "x@y.z"})
    assert c.decode_payload("email.received", 1, msgspec.msgpack.encode({**base, "from": "q@r"})).from_ == "q@r"


def test_console_line_keeps_the_file_name_of_a_long_path(capsys):
    import structlog

    from nexus.contracts import FileChanged
    from nexus.member.context import Context
    from nexus.protocol.events import Event
    from workers.console import handle

    path = "/very/long/" + "nested/" * 20 + "hello.txt"
    event = Event(
        type="file.created", source="file:inbox", payload=FileChanged(path=path, watcher="inbox"), id="id-1", time=1.0
    )
    handle(event, Context("console", "console-0", 1, False, 7, 3, {}, structlog.get_logger(), None, "id-1", None))
    line = capsys.readouterr().out
    assert line.count("\n") == 1 and "file.created from file:inbox" in line and "hello.txt" in line
