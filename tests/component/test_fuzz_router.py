"""Hostile input at every router endpoint, over real sockets (hypothesis).

The router must stay up, reject each input with a reason (counted by reason in
status), and keep accepting valid events from other producers meanwhile.
"""

from __future__ import annotations

import collections
import os
import threading

import msgspec
import pytest
import zmq
from conftest import recorder_group
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from recorder import read_handled

from nexus import Producer, config
from nexus.protocol.transport import MAX_MESSAGE_BYTES
from nexus.protocol.wire import ProducerReply, StatusRequest, coord_decoder, encoder
from nexus.testing import wait_for

MAX_EVENT = 4096
enc = msgspec.msgpack.encode
VALID_EVENT = {"type": "test.fuzz", "source": "fuzz", "payload": {"n": 1}, "id": "x", "time": 1.0}

scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(-(2**63), 2**64 - 1),
    st.floats(allow_nan=True),
    st.text(max_size=20),
    st.binary(max_size=20),
)
values = st.recursive(
    scalars,
    lambda children: st.one_of(
        st.lists(children, max_size=4), st.dictionaries(st.text(max_size=8), children, max_size=4)
    ),
    max_leaves=12,
)


def _safe(v):
    try:
        return enc(v)
    except (OverflowError, TypeError):
        return b"\xc0"


# each strategy yields (kind, frames)
raw_bytes = st.binary(max_size=3000).map(lambda b: ("bytes", [b]))
truncated = st.tuples(st.integers(1, 5), st.integers(0, 400)).map(
    lambda t: ("truncated", [enc({"events": [VALID_EVENT] * t[0], "producer": "trunc", "seq": 1})[: t[1]]])
)
wrong_types = st.fixed_dictionaries({"events": values, "producer": values, "seq": values}).map(
    lambda d: ("wrong_types", [_safe(d)])
)
unknown_fields = st.dictionaries(st.text(min_size=1, max_size=10), values, min_size=1, max_size=3).map(
    lambda extra: (
        "unknown_fields",
        [enc({"events": [{**VALID_EVENT, **extra}], "producer": "uf", "seq": 1, **{f"x{k}": 1 for k in extra}})],
    )
)
bad_events = st.lists(
    st.one_of(
        values.map(_safe),
        st.just(enc({**VALID_EVENT, "type": "Bad"})),
        st.just(enc({**VALID_EVENT, "payload": "x" * MAX_EVENT})),
        st.just(enc({**VALID_EVENT, "time": float("nan")})),
    ),
    max_size=5,
).map(
    lambda evs: (
        "bad_events",
        [b"\x83\xa6events" + bytes([0x90 + len(evs)]) + b"".join(evs) + b"\xa8producer\xa3bad\xa3seq\x01"],
    )
)
deep = st.integers(100, 200_000).map(
    lambda depth: (
        "deep_nesting",
        [
            b"\x83\xa6events\x91"
            + b"\x85\xa4type\xa8test.fuzz\xa6source\xa1s\xa2id\xa1i\xa4time\x01\xa7payload"
            + b"\x91" * depth
            + b"\x01"
            + b"\xa8producer\xa4deep\xa3seq\x01"
        ],
    )
)
multi_frame = st.lists(st.binary(max_size=50), min_size=2, max_size=5).map(lambda fs: ("multi_frame", fs))
hostile = st.one_of(raw_bytes, truncated, wrong_types, unknown_fields, bad_events, deep, multi_frame)


@pytest.fixture
def fuzz_setup(tmp_path, config_factory, components):
    out = tmp_path / "out"
    path = config_factory(
        router={
            "ingest": "ipc://{data_dir}/run/ingest",
            "confirm": "ipc://{data_dir}/run/confirm",
            "max_event_bytes": MAX_EVENT,
        },
        workers={"rec": recorder_group(out)},
    )
    cfg = config.load(path)
    router = components.router(cfg)
    wait_for(lambda: os.path.exists(cfg.coord[len("ipc://") :]), 10, message="router bound")
    components.member(cfg, "rec", "rec-0")
    ctx = zmq.Context.instance()
    socks = {"ingest": ctx.socket(zmq.PUSH), "confirm": ctx.socket(zmq.DEALER), "coord": ctx.socket(zmq.DEALER)}
    for name, sock in socks.items():
        sock.setsockopt(zmq.LINGER, 0)
        sock.connect(getattr(cfg, name))
    yield cfg, router, socks, out
    for sock in socks.values():
        sock.close(0)


def test_hostile_input_at_every_endpoint(fuzz_setup):
    cfg, router, socks, out = fuzz_setup
    kinds: collections.Counter[str] = collections.Counter()
    stop = threading.Event()
    good: list[str] = []
    errors: list[BaseException] = []

    def steady_producer():  # valid events from another producer, all along
        try:
            with Producer(cfg.confirm, source="steady") as producer:
                while not stop.is_set():
                    good.append(producer.send("test.good", {"n": len(good)}))
                    if len(good) % 20 == 0:
                        producer.flush(30)
        except BaseException as exc:
            errors.append(exc)

    thread = threading.Thread(target=steady_producer)
    thread.start()

    @settings(
        max_examples=400,
        deadline=None,
        database=None,
        suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow, HealthCheck.data_too_large],
    )
    @given(message=hostile)
    def throw(message):
        kind, frames = message
        kinds[kind] += 1
        socks["ingest"].send_multipart(frames)
        socks["coord"].send_multipart(frames)
        socks["confirm"].send_multipart(frames)
        assert socks["confirm"].poll(10_000), f"no reply to {kind} on confirm"
        msgspec.msgpack.decode(socks["confirm"].recv(), type=ProducerReply)
        while socks["coord"].poll(0):
            coord_decoder.decode(socks["coord"].recv())

    try:
        throw()
    finally:
        stop.set()
        thread.join(60)
    assert not errors, errors
    # the router is alive, answers, counted every rejection by reason
    socks["coord"].send(encoder.encode(StatusRequest()))
    while True:
        assert socks["coord"].poll(10_000), "router did not answer status"
        reply = coord_decoder.decode(socks["coord"].recv())
        if hasattr(reply, "data"):
            break
    reasons = reply.data["router"]["rejected_by_reason"]
    wait_for(lambda: set(good) <= {r[1] for r in read_handled(str(out))}, 60, message="valid events delivered")
    print(
        f"\nFUZZ-REPORT inputs={sum(kinds.values())} x 3 endpoints kinds={dict(kinds)} "
        f"rejected_by_reason={reasons} valid_events_delivered_meanwhile={len(good)}"
    )
    assert {"bad_batch", "malformed", "bad_coord"} <= set(reasons)
    assert reasons.get("internal", 0) == 0


def test_messages_over_the_size_cap_are_dropped_at_the_socket(fuzz_setup):
    cfg, router, socks, out = fuzz_setup
    huge = b"\x00" * (MAX_MESSAGE_BYTES + 1)
    for name in ("ingest", "confirm", "coord"):
        socks[name].send(huge)  # ZeroMQ drops the peer; the router never sees it
    with Producer(cfg.confirm, source="after-huge") as producer:
        event_id = producer.send("test.after", {"ok": True})
    wait_for(lambda: event_id in {r[1] for r in read_handled(str(out))}, 30, message="valid event after huge ones")
