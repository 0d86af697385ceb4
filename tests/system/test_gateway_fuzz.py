"""A hypothesis fuzz of `POST /v1/events`, of `/v1/stream` frames and of `/v1/subscribe`
query strings and headers against the real gateway process, while a thread sends valid
events through it the whole time: malformed JSON and msgpack, wrong types and shapes,
binary garbage, huge bodies, frames and batches, abused headers. Every answer must be a
documented status with a one-line JSON error or per-event results / acks (never a 500 or
a dropped connection; a frame over max_body closes its stream with 1009 and one line),
and every valid event sent meanwhile must be accepted and handled."""

from __future__ import annotations

import asyncio
import http.client
import json
import socket
import threading
import urllib.parse

import aiohttp
import msgspec
import pytest
from gateway_support import FULL, NARROW, READER, event, gateway_config, wait_up
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


# -- /v1/stream: frames ----------------------------------------------------------------------
HUGE = st.integers(MAX_BODY + 1, MAX_BODY + 200_000)
frames = st.one_of(
    st.text(max_size=300).map(lambda t: ("text", t)),  # JSON or not
    fields.map(lambda f: ("text", json.dumps(f))),
    st.lists(fields, min_size=0, max_size=20).map(lambda fs: ("text", json.dumps(fs))),
    json_values.map(lambda v: ("text", json.dumps(v))),  # valid JSON of the wrong shape
    st.binary(max_size=300).map(lambda b: ("binary", b)),  # garbage
    st.lists(fields, max_size=5).map(lambda fs: ("binary", pack(fs))),
    json_values.map(lambda v: ("binary", pack(v))),  # msgpack of the wrong shape
    fields.map(lambda f: ("binary", pack(f))),
    HUGE.map(lambda n: ("text", '{"type": "test.f", "source": "f", "payload": "%s"}' % ("x" * n))),
    HUGE.map(lambda n: ("binary", b"\x00" * n)),
)


class StreamClient:
    """One /v1/stream connection, driven from sync code (hypothesis) on its own loop; a
    frame the gateway closes the connection for (too big) opens a new one."""

    def __init__(self, base: str):
        self.url = base.replace("http", "ws") + "/v1/stream"
        self.loop = asyncio.new_event_loop()
        self.session = self.loop.run_until_complete(self._session())
        self.ws: aiohttp.ClientWebSocketResponse | None = None
        self.n = 0
        self.closes: list[tuple[int, str]] = []
        self.sentinels: set[str] = set()  # ACKed (one after each frame not closed for)

    async def _session(self) -> aiohttp.ClientSession:
        return aiohttp.ClientSession(headers={"Authorization": f"Bearer {FULL}"})

    def send(self, kind: str, data) -> list[dict] | None:
        """The acks of the frame (those before the valid sentinel's), or None if the
        gateway closed the connection for it (the close is in `closes`)."""
        return self.loop.run_until_complete(asyncio.wait_for(self._send(kind, data), 60))

    async def _send(self, kind: str, data) -> list[dict] | None:
        if self.ws is None or self.ws.closed:
            self.ws = await self.session.ws_connect(self.url, max_msg_size=0)
        ws = self.ws
        self.n += 1
        sentinel = f"sentinel-{self.n}"
        await (ws.send_str(data) if kind == "text" else ws.send_bytes(data))
        await ws.send_str(json.dumps(event(id=sentinel)))  # valid traffic on the same stream
        acks: list[dict] = []
        while True:
            msg = await ws.receive(timeout=30)
            if msg.type in (aiohttp.WSMsgType.CLOSE, aiohttp.WSMsgType.CLOSED):
                # (CLOSED: the close frame was lost, the gateway closed while this still sent)
                self.closes.append((msg.data, msg.extra or "") if msg.type == aiohttp.WSMsgType.CLOSE else (0, ""))
                await ws.close()
                return None
            assert msg.type in (aiohttp.WSMsgType.TEXT, aiohttp.WSMsgType.BINARY), msg
            ack = json.loads(msg.data) if msg.type == aiohttp.WSMsgType.TEXT else msgspec.msgpack.decode(msg.data)
            if ack["id"] == sentinel:
                assert ack["status"] == "accepted", ack
                self.sentinels.add(sentinel)
                return acks
            acks.append(ack)

    def close(self) -> None:
        async def done() -> None:
            if self.ws is not None:
                await self.ws.close()
            await self.session.close()

        self.loop.run_until_complete(done())
        self.loop.close()


def test_fuzz_stream_frames_with_valid_traffic(gw):
    p, base, out = gw
    flow = ValidFlow(int(base.rsplit(":", 1)[1]))
    flow.start()
    client = StreamClient(base)
    acks: dict[str, int] = {}

    @settings(max_examples=200, deadline=None, suppress_health_check=list(HealthCheck), derandomize=True)
    @given(frame=frames)
    def fuzz(frame: tuple[str, str | bytes]) -> None:
        kind, data = frame
        got = client.send(kind, data)
        if got is None:  # closed for it: only a frame over max_body, with 1009 and one line
            assert len(data) > MAX_BODY, (kind, data[:100])
            code, reason = client.closes[-1]
            assert code == 0 or (code == 1009 and reason.startswith("a message over") and "\n" not in reason), code
            acks["closed (too big)"] = acks.get("closed (too big)", 0) + 1
            return
        # one ack per event, or one for a frame that is not events (an empty array: none)
        assert got or data in ("[]", b"\x90"), (kind, data[:100])
        for ack in got:
            assert ack["status"] in ("accepted", "rejected"), ack
            assert ack["status"] == "accepted" or ("\n" not in ack["reason"] and "Traceback" not in ack["reason"])
            acks[ack["status"]] = acks.get(ack["status"], 0) + 1

    try:
        fuzz()
    finally:
        client.close()
        flow.stop.set()
        flow.join(60)
    print(f"stream fuzz: {client.n} frames, acks {acks}, sentinels all accepted; valid flow sent {flow.sent}")
    assert not flow.failures, flow.failures[:3]
    assert len(flow.acked) == flow.sent
    assert len(client.sentinels) == client.n - acks.get("closed (too big)", 0)
    want = flow.acked | client.sentinels
    wait_for(lambda: want <= {r[1] for r in read_handled(str(out))}, 60, 0.1, "valid events handled")


# -- /v1/subscribe: query strings and headers ------------------------------------------------
def mostly(good, bad: st.SearchStrategy) -> st.SearchStrategy:
    """`good` 7 times in 10, else `bad` (one_of would not weigh repeated branches)."""
    return st.integers(0, 9).flatmap(lambda i: st.just(good) if i < 7 else bad)


SUBSCRIBE_DOCUMENTED = {101, 400, 401, 403, 503}
query_text = st.text(max_size=60)
queries = st.one_of(
    st.fixed_dictionaries(
        {"types": mostly("test.*", st.sampled_from(["*", "test.a,test.b", "", ",,,", "other.*"]) | query_text)},
        optional={
            "from": st.sampled_from(["0", "1", "-1", "9" * 25, "1e3", " 1", ""]) | query_text,
            "junk": query_text,
        },
    ).map(urllib.parse.urlencode),
    st.lists(st.sampled_from(["types=test.*", "from=0", "types=", "from=", "types=%ff%fe", "&", "=", "%", "a=b"])).map(
        "&".join
    ),
    st.text(alphabet=st.sampled_from("abt=&%*,.?;/09+"), max_size=100),
)
GOOD_HANDSHAKE = {
    "Upgrade": "websocket",
    "Connection": "Upgrade",
    "Sec-WebSocket-Version": "13",
    "Sec-WebSocket-Key": "dGhlIHNhbXBsZSBub25jZQ==",
}


handshakes = mostly(
    GOOD_HANDSHAKE,  # the query and the token are what is fuzzed most
    st.fixed_dictionaries(
        {
            "Upgrade": st.sampled_from(["websocket", "", "h2c", "WebSocket, x"]),
            "Connection": st.sampled_from(["Upgrade", "", "close", "keep-alive, Upgrade"]),
            "Sec-WebSocket-Version": st.sampled_from(["13", "", "8", "x" * 50]),
            "Sec-WebSocket-Key": st.sampled_from(["dGhlIHNhbXBsZSBub25jZQ==", "", "short", "!" * 100]),
        }
    ),
)
ws_headers = st.tuples(
    handshakes,
    st.fixed_dictionaries(
        {
            "Authorization": mostly(
                f"Bearer {READER}",
                st.sampled_from([f"Bearer {NARROW}", f"Bearer {FULL}", "Bearer", "Basic Zm9v", ""])
                | ascii_text.map(lambda t: "Bearer " + t),
            ),
        },
        optional={
            "Sec-WebSocket-Protocol": st.one_of(
                st.just(f"nexus.v1, bearer.{READER}"), st.just("bearer."), ascii_text, st.just(",,, ,")
            ),
            "Origin": ascii_text,
            "X-Junk": st.text(alphabet=st.characters(min_codepoint=32, max_codepoint=126), max_size=4000),
        },
    ),
).map(lambda pair: {**pair[0], **pair[1]})


def subscribe_once(port: int, query: str, hdrs: dict[str, str]) -> tuple[int, bytes]:
    """(status, body) of one handshake; a 101 is closed at once (its body is the stream)."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    try:
        conn.request("GET", f"/v1/subscribe?{query}", headers={k: v for k, v in hdrs.items() if v})
        resp = conn.getresponse()
        return resp.status, b"" if resp.status == 101 else resp.read()
    finally:
        conn.close()


def test_fuzz_subscribe_queries_and_headers_with_valid_traffic(gw):
    p, base, out = gw
    port = int(base.rsplit(":", 1)[1])
    flow = ValidFlow(port)
    flow.start()
    codes: dict[int, int] = {}

    @settings(max_examples=200, deadline=None, suppress_health_check=list(HealthCheck), derandomize=True)
    @given(query=queries, hdrs=ws_headers)
    def fuzz(query: str, hdrs: dict[str, str]) -> None:
        code, answer = subscribe_once(port, query, hdrs)
        codes[code] = codes.get(code, 0) + 1
        assert code in SUBSCRIBE_DOCUMENTED, (code, answer[:300])
        if code != 101:
            error = json.loads(answer)["error"]
            assert isinstance(error, str) and error and "\n" not in error and "Traceback" not in error

    try:
        fuzz()
    finally:
        flow.stop.set()
        flow.join(60)
    print(f"subscribe fuzz: answers by status {dict(sorted(codes.items()))}; valid flow sent {flow.sent}")
    assert not flow.failures, flow.failures[:3]
    assert len(flow.acked) == flow.sent
    assert wait_up(base) is None  # the gateway still answers
    wait_for(lambda: flow.acked <= {r[1] for r in read_handled(str(out))}, 60, 0.1, "valid events handled")
