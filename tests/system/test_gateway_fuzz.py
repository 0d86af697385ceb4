"""A hypothesis fuzz of `POST /v1/events` against the real gateway process, while a
thread sends valid events through it the whole time: malformed JSON and msgpack, wrong
types, huge bodies and batches, abused headers. Every answer must be a documented status
with a one-line JSON error or per-event results (never a 500 or a dropped connection),
and every valid event sent meanwhile must be accepted and handled."""

from __future__ import annotations

import http.client
import json
import socket
import threading

import msgspec
import pytest
from gateway_support import FULL, NARROW, event, gateway_config, wait_up
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from recorder import read_handled

from nexus.testing import LaunchedPipeline, wait_for

pytestmark = pytest.mark.system

DOCUMENTED = {200, 207, 400, 401, 403, 413, 415, 429}
MAX_BODY = 1_048_576  # gateway.max_body's default


def pack(value) -> bytes:
    try:
        return msgspec.msgpack.encode(value)
    except OverflowError:  # (an int past 64 bits: msgpack has none; JSON bodies keep them)
        return msgspec.msgpack.encode([{"type": "test.fuzz", "source": "f", "payload": str(value)[:100]}])


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=20),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
    max_leaves=12,
)
# events with each field possibly of the wrong type, missing or extra
fields = st.fixed_dictionaries(
    {},
    optional={
        "type": st.sampled_from(["test.fuzz", "Test.Bad", "x", "nope.unknown", "parrot.notification"]) | json_values,
        "source": st.sampled_from(["fuzz", "", "a\nb", "s" * 200]) | json_values,
        "payload": json_values,
        "id": st.text(min_size=1, max_size=80) | json_values,
        "time": st.floats() | json_values,
        "priority": st.integers(-5, 20) | json_values,
        "key": st.text(max_size=10) | st.none() | json_values,
        "v": st.integers(-1, 2000) | json_values,
        "extra": json_values,
    },
)
bodies = st.one_of(
    st.binary(max_size=300),
    st.text(max_size=300).map(str.encode),
    fields.map(lambda f: json.dumps(f).encode()),
    st.lists(fields, min_size=0, max_size=20).map(lambda fs: json.dumps(fs).encode()),
    st.lists(fields, max_size=5).map(pack),
    st.integers(1_000_000, 1_200_000).map(lambda n: b'{"type": "test.f", "source": "f", "payload": "%s"}' % (b"x" * n)),
)
ascii_text = st.text(alphabet=st.characters(min_codepoint=32, max_codepoint=126), max_size=300)
headers = st.fixed_dictionaries(
    {
        # mostly a good token and type, so most bodies reach the decoder and the router
        "Content-Type": st.sampled_from(
            ["application/json"] * 4
            + ["application/msgpack"] * 2
            + ["text/plain", "application/json; charset=utf-8", "", "a/b;;;"]
        ),
        "Authorization": st.one_of(
            *[st.just(f"Bearer {FULL}")] * 4,
            st.sampled_from([f"Bearer {NARROW}", "Bearer", "bearer x", "Basic Zm9v", ""]),
            ascii_text.map(lambda t: "Bearer " + t),
        ),
    },
    optional={
        "X-Junk": st.text(alphabet=st.characters(min_codepoint=32, max_codepoint=126), max_size=4000),
        "Content-Encoding": st.sampled_from(["gzip", "br", "identity"]),
    },
)


@pytest.fixture(scope="module")
def gw(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("gwfuzz")
    path, base = gateway_config(tmp)
    with LaunchedPipeline(path) as p:
        wait_up(base)
        yield p, base, tmp / "out"


class ValidFlow(threading.Thread):
    """Valid events, one request after another, for as long as the fuzz runs."""

    def __init__(self, port: int):
        super().__init__(daemon=True)
        self.port = port
        self.stop = threading.Event()
        self.acked: set[str] = set()
        self.failures: list[tuple[int, str]] = []
        self.sent = 0

    def run(self) -> None:
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=30)
        while not self.stop.is_set():
            batch = [event(id=f"valid-{self.sent + i}") for i in range(10)]
            self.sent += len(batch)
            conn.request(
                "POST",
                "/v1/events",
                json.dumps(batch),
                {"Authorization": f"Bearer {FULL}", "Content-Type": "application/json"},
            )
            resp = conn.getresponse()
            body = resp.read()
            if resp.status == 200:
                self.acked.update(r["id"] for r in json.loads(body)["results"])
            else:
                self.failures.append((resp.status, body.decode(errors="replace")))
        conn.close()


def post(port: int, body: bytes, hdrs: dict[str, str]) -> tuple[int, bytes]:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    try:
        conn.request("POST", "/v1/events", body, {k: v for k, v in hdrs.items() if v} | {"Connection": "close"})
    except (BrokenPipeError, ConnectionResetError):
        # the gateway answered 413 from Content-Length alone and closed while this client
        # still wrote the body (curl and aiohttp read that answer; http.client cannot)
        assert len(body) > MAX_BODY, len(body)
        return 413, b'{"error": "(closed while sending the body)"}'
    try:
        resp = conn.getresponse()
        return resp.status, resp.read()
    finally:
        conn.close()


def test_fuzz_events_with_valid_traffic(gw):
    p, base, out = gw
    port = int(base.rsplit(":", 1)[1])
    flow = ValidFlow(port)
    flow.start()
    codes: dict[int, int] = {}

    @settings(max_examples=250, deadline=None, suppress_health_check=list(HealthCheck), derandomize=True)
    @given(body=bodies, hdrs=headers)
    def fuzz(body: bytes, hdrs: dict[str, str]) -> None:
        code, answer = post(port, body, hdrs)
        codes[code] = codes.get(code, 0) + 1
        assert code in DOCUMENTED, (code, answer[:300])
        reply = json.loads(answer)
        if code in (200, 207):
            assert all(r["status"] in ("accepted", "rejected") for r in reply["results"])
        else:
            assert isinstance(reply["error"], str) and "\n" not in reply["error"] and "Traceback" not in reply["error"]

    try:
        fuzz()
        # a lying Content-Length: refused before the body is read
        with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
            s.sendall(
                b"POST /v1/events HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                b"Authorization: Bearer " + FULL.encode() + b"\r\nContent-Length: 99999999999\r\n\r\n{}"
            )
            assert s.recv(100).startswith(b"HTTP/1.1 413")
    finally:
        flow.stop.set()
        flow.join(60)
    by_status = dict(sorted(codes.items()))
    print(f"fuzz: answers by status {by_status}; valid flow sent {flow.sent}, ACKed {len(flow.acked)}")
    assert not flow.failures, flow.failures[:3]
    assert len(flow.acked) == flow.sent
    wait_for(lambda: flow.acked <= {r[1] for r in read_handled(str(out))}, 60, 0.1, "valid events handled")
