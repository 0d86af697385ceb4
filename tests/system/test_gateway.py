"""System tests of the gateway process (issue 15): a launched pipeline with
`gateway.listen`, real clients (curl, aiohttp's HTTP and WebSocket client): accept and
reject paths, retries without duplicates, /v1/stream acks in order, TLS, the refusals of
a bad `gateway.listen` at start."""

from __future__ import annotations

import asyncio
import json
import os
import stat
import subprocess
import sys
import urllib.error
import urllib.request

import aiohttp
import msgspec
import pytest
from conftest import write_config
from gateway_support import (
    API,
    FULL,
    NARROW,
    READER,
    SLOW,
    check_api,
    check_schema,
    curl,
    event,
    gateway_config,
    wait_up,
)
from recorder import read_handled, tally

from nexus.errors import ExitCode
from nexus.testing import LaunchedPipeline, free_port, wait_for

pytestmark = pytest.mark.system


@pytest.fixture(scope="module")
def gw(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("gw")
    path, base = gateway_config(tmp)
    with LaunchedPipeline(path) as p:
        wait_up(base)
        yield p, base, tmp / "out"


def handled_ids(out) -> list[str]:
    return [row[1] for row in read_handled(str(out))]


def test_accept_reject_paths_with_curl(gw):
    p, base, out = gw
    url = f"{base}/v1/events"
    # one event: accepted after the router journaled it; id and time filled in
    code, body = curl(url, json.dumps(event(payload={"x": "one"})))
    assert code == 200 and body["results"][0]["status"] == "accepted" and body["results"][0]["id"]
    # a batch: the router's reason per event
    parrot_bad = event("parrot.notification", payload={"app_id": "a"})
    batch = [event(id="ok-1"), parrot_bad, event("nope.unknown", id="unk-1"), {"type": 5, "id": "mal-1"}]
    code, body = curl(url, json.dumps(batch))
    assert code == 207, body
    statuses = [(r["status"], r.get("reason", "").split(":")[0]) for r in body["results"]]
    want = [("accepted", ""), ("rejected", "contract"), ("rejected", "unknown_type"), ("rejected", "malformed")]
    assert statuses == want
    assert body["results"][0]["id"] == "ok-1" and body["results"][2]["id"] == "unk-1"
    assert body["results"][3]["id"] == "mal-1"
    assert "retry_after" not in body["results"][1]  # only a retryable refusal carries one
    # whole-request refusals: one line each, nothing sent
    assert curl(url, json.dumps(event()), token=None) == (401, {"error": curl(url, "{}", token="x")[1]["error"]})
    code, body = curl(url, json.dumps(event("test.other", source="parrot")), token=NARROW)
    assert code == 403 and body["error"].startswith("forbidden: token 'narrow'")
    assert curl(url, json.dumps(event("test.narrow.ok", source="parrot")), token=NARROW)[0] == 200
    code, body = curl(url, '{"type": "test.gw", "source": ')
    assert code == 400 and body["error"].startswith("malformed JSON") and "\n" not in body["error"]
    assert curl(url, "hello")[0] == 400
    assert curl(url, "[]")[0] == 400
    code, body = curl(url, json.dumps(event(payload={"big": "x" * 2_000_000})))
    assert code == 413 and "gateway.max_body" in body["error"]
    code, body = curl(url, json.dumps([event() for _ in range(1001)]))
    assert code == 413 and "gateway.max_batch" in body["error"]
    assert curl(url, "a=b", FULL, "application/x-www-form-urlencoded")[0] == 415
    # msgpack, by content type
    packed = msgspec.msgpack.encode([event(id="mp-1"), event(id="mp-2")])
    code, body = curl(url, packed, FULL, "application/msgpack")
    assert code == 200 and [r["id"] for r in body["results"]] == ["mp-1", "mp-2"]
    wait_for(lambda: {"ok-1", "mp-1", "mp-2"} <= set(handled_ids(out)), 20, 0.05, "accepted events handled")
    assert "unk-1" not in handled_ids(out)


def test_rate_limit_per_token(gw):
    _, base, _ = gw
    url = f"{base}/v1/events"
    assert curl(url, json.dumps(event()), SLOW)[0] == 200
    req = urllib.request.Request(url, json.dumps(event()).encode(), method="POST")
    req.add_header("Authorization", f"Bearer {SLOW}")
    req.add_header("Content-Type", "application/json")
    with pytest.raises(urllib.error.HTTPError) as refused:
        urllib.request.urlopen(req, timeout=10)
    assert refused.value.code == 429 and 1 <= int(refused.value.headers["Retry-After"]) <= 100
    assert json.loads(refused.value.read())["error"].startswith("rate limited: token 'slow'")
    # more than the token may ever send in one request: 413, not an endless 429
    assert curl(url, json.dumps([event(), event()]), SLOW)[0] == 413


def test_retries_never_journal_an_id_twice(gw):
    p, base, out = gw

    async def run() -> list[dict]:
        batch = [event(id=f"retry-{i}") for i in range(50)]
        async with aiohttp.ClientSession(headers={"Authorization": f"Bearer {FULL}"}) as s:
            # the same request three times, two of them at once (a client retrying early)
            replies = await asyncio.gather(*(s.post(f"{base}/v1/events", json=batch) for _ in range(2)))
            third = await s.post(f"{base}/v1/events", json=batch)
            bodies = [await r.json() for r in (*replies, third)]
            assert [r.status for r in (*replies, third)] == [200, 200, 200]
            return bodies

    bodies = asyncio.run(run())
    assert all(r["status"] == "accepted" for b in bodies for r in b["results"])
    assert all(r.get("duplicate") for r in bodies[2]["results"])
    want = {f"retry-{i}" for i in range(50)}
    wait_for(lambda: want <= set(handled_ids(out)), 20, 0.05, "retried events handled")
    status = p.router_status()
    assert status is not None
    handled = [i for i in handled_ids(out) if i in want]
    ids, flagged, unflagged = tally([r for r in read_handled(str(out)) if r[1] in want])
    print(f"retries: sent 3x50, accepted {len(want)}, handled {len(handled)}, duplicates {flagged}/{unflagged}")
    assert sorted(handled) == sorted(want)  # each handled once: journaled once


def test_stream_acks_in_order(gw):
    _, base, out = gw
    n = 3000  # above the per-connection window: back-pressure engages

    async def run() -> list[dict]:
        acks: list[dict] = []
        async with aiohttp.ClientSession() as s:
            ws_url = base.replace("http", "ws") + "/v1/stream"
            async with s.ws_connect(ws_url, headers={"Authorization": f"Bearer {FULL}"}) as ws:

                async def read() -> None:
                    while len(acks) < n + 2:
                        msg = await ws.receive(timeout=30)
                        text = msg.type == aiohttp.WSMsgType.TEXT
                        acks.append(msg.json() if text else msgspec.msgpack.decode(msg.data))

                reader = asyncio.ensure_future(read())
                for i in range(0, n, 100):
                    await ws.send_str(json.dumps([event(id=f"ws-{j}") for j in range(i, i + 100)]))
                await ws.send_bytes(msgspec.msgpack.encode(event("nope.unknown", id="ws-unknown")))
                await ws.send_str("not json")
                await asyncio.wait_for(reader, 60)
        return acks

    acks = asyncio.run(run())
    assert [a["id"] for a in acks[:n]] == [f"ws-{i}" for i in range(n)]
    assert all(a["status"] == "accepted" for a in acks[:n])
    assert acks[n]["status"] == "rejected" and acks[n]["reason"].startswith("unknown_type")
    assert acks[n + 1] == {"id": "", "status": "rejected", "reason": acks[n + 1]["reason"]}
    want = {f"ws-{i}" for i in range(n)}
    wait_for(lambda: want <= set(handled_ids(out)), 30, 0.05, "stream events handled")


def test_stream_needs_a_token(gw):
    _, base, _ = gw

    async def run() -> int:
        async with aiohttp.ClientSession() as s:
            try:
                async with s.ws_connect(base.replace("http", "ws") + "/v1/stream"):
                    return 101
            except aiohttp.WSServerHandshakeError as exc:
                return exc.status

    assert asyncio.run(run()) == 401


def test_metrics_count_refusals(gw):
    _, base, _ = gw
    curl(f"{base}/v1/events", "{}", token="wrong")
    text = subprocess.run(
        ["curl", "-sS", f"{base}/metrics", "-H", f"Authorization: Bearer {FULL}"], capture_output=True, timeout=10
    ).stdout.decode()
    assert 'nexus_gateway_auth_refused_total{code="401"}' in text
    assert 'nexus_gateway_events_total{outcome="accepted"}' in text


def test_ledger_is_private(gw):
    p, _, _ = gw
    folder = os.path.join(p.cfg.data_dir, "gateway")
    assert stat.S_IMODE(os.stat(folder).st_mode) == 0o700
    assert stat.S_IMODE(os.stat(os.path.join(folder, "ledger")).st_mode) == 0o600


@pytest.mark.parametrize(
    ("gateway", "says"),
    [
        ({"listen": "0.0.0.0:{port}"}, "reachable from other hosts: set gateway.tls.cert"),
        ({"listen": "127.0.0.1:99999"}, "gateway.listen '127.0.0.1:99999': expected host:port"),
        ({"listen": "127.0.0.1:{port}", "tls": {"cert": "missing.pem"}}, "gateway.tls: set both cert and key"),
    ],
)
def test_bad_listen_is_one_line_at_start(tmp_path, gateway, says):
    gateway = {**gateway, "listen": gateway["listen"].replace("{port}", str(free_port()))}
    path = write_config(tmp_path, gateway=gateway)
    cmd = [sys.executable, "-m", "nexus.launch", "-c", str(path)]
    run = subprocess.run(cmd, capture_output=True, text=True, timeout=60)
    assert run.returncode == ExitCode.CONFIG
    assert says in run.stderr and "Traceback" not in run.stderr


def test_tls(tmp_path):
    from tlscerts import TestPKI  # the TLS tests' throwaway CA

    pki = TestPKI(tmp_path / "pki")
    tls = {"cert": str(pki.server_cert), "key": str(pki.server_key)}
    path, base = gateway_config(tmp_path, gateway={"tls": tls})
    base = base.replace("http://", "https://")
    with LaunchedPipeline(path):
        url = f"{base}/v1/events"
        wait_for(lambda: _curl_ok(url, pki.ca), 30, 0.1, "gateway over TLS")
        code, body = curl(url, json.dumps(event()), FULL, "application/json", "--cacert", str(pki.ca))
        assert code == 200 and body["results"][0]["status"] == "accepted"


def _curl_ok(url: str, ca) -> bool:
    try:
        return curl(url, json.dumps(event()), FULL, "application/json", "--cacert", str(ca))[0] == 200
    except subprocess.CalledProcessError:
        return False


def test_responses_match_the_openapi_document(gw):
    """docs/http-api.yaml is a valid OpenAPI 3.1 document, and the running gateway's real
    answers (every status code /v1/events and /healthz can give here) validate against
    the schema it documents for that route and code."""
    from openapi_spec_validator import validate

    validate(API)
    _, base, _ = gw
    url = f"{base}/v1/events"
    cases = [
        (json.dumps(event()), FULL, "application/json"),
        (json.dumps([event(), event("nope.unknown")]), FULL, "application/json"),
        ('{"type": ', FULL, "application/json"),
        (json.dumps(event()), "bad", "application/json"),
        (json.dumps(event("test.x", source="parrot")), NARROW, "application/json"),
        (json.dumps([event() for _ in range(1001)]), FULL, "application/json"),
        ("x=1", FULL, "text/plain"),
    ]
    seen = set()
    for body, token, ctype in cases:
        code, answer = curl(url, body, token, ctype)
        check_api("/v1/events", "post", code, answer)
        seen.add(code)
    assert seen == {200, 207, 400, 401, 403, 413, 415}
    with urllib.request.urlopen(f"{base}/healthz", timeout=5) as resp:
        check_api("/healthz", "get", resp.status, json.loads(resp.read()))


def test_an_id_is_an_idempotency_key_within_its_token_only(gw):
    """A retry with the same token is a duplicate; another token's event with the same id is
    its own event and journaled (one token must not suppress another's events by sending
    their ids first)."""
    p, base, _ = gw
    url = f"{base}/v1/events"
    before = p.router_status()["router"]["seq"]
    shared = event("test.narrow.shared", source="parrot", id="shared-id-1")
    code, body = curl(url, json.dumps(shared), FULL)
    assert code == 200 and body["results"][0] == {"id": "shared-id-1", "status": "accepted"}
    code, body = curl(url, json.dumps(shared), FULL)  # the same token again: a duplicate
    assert code == 200 and body["results"][0] == {"id": "shared-id-1", "status": "accepted", "duplicate": True}
    code, body = curl(url, json.dumps(shared), NARROW)  # another token: its own event
    assert code == 200 and body["results"][0] == {"id": "shared-id-1", "status": "accepted"}
    assert p.router_status()["router"]["seq"] == before + 2


def test_websocket_messages_match_the_openapi_document(gw):
    """The messages of /v1/stream (Result per event) and /v1/subscribe (SubscribeStart, then
    SubscribeEvent per journaled event) of the running gateway validate against the schemas
    docs/http-api.yaml gives them; and the subscriber gets the events the stream sent."""
    _, base, _ = gw
    ws_base = base.replace("http", "ws")
    ids = [f"ws-doc-{i}" for i in range(3)]

    async def run() -> tuple[list[dict], list[dict]]:
        timeout = aiohttp.ClientTimeout(total=30)
        async with aiohttp.ClientSession(timeout=timeout) as s:
            reader_auth = {"Authorization": f"Bearer {READER}"}
            async with s.ws_connect(f"{ws_base}/v1/subscribe?types=test.gw", headers=reader_auth) as sub:
                start = await sub.receive_json(timeout=10)  # from now: before the events go out
                async with s.ws_connect(f"{ws_base}/v1/stream", headers={"Authorization": f"Bearer {FULL}"}) as ws:
                    for i in ids:
                        await ws.send_json(event(id=i))
                    acks = [await ws.receive_json(timeout=10) for _ in ids]
                    await ws.send_json({"type": "nope.unknown", "source": "x", "payload": {}, "id": "ws-doc-bad"})
                    acks.append(await ws.receive_json(timeout=10))
                got = [start]
                while not set(ids) <= {m.get("id") for m in got}:
                    got.append(await sub.receive_json(timeout=10))
                return acks, got

    acks, messages = asyncio.run(run())
    for ack in acks:
        check_schema("Result", ack)
    assert [a["status"] for a in acks] == ["accepted"] * 3 + ["rejected"]
    check_schema("SubscribeStart", messages[0])
    for m in messages[1:]:
        check_schema("SubscribeEvent", m)
    assert [m["id"] for m in messages[1:]] == ids  # in journal order, each once


def test_reload_turns_the_gateway_on_and_moves_it(tmp_path):
    path, base = gateway_config(tmp_path)
    text = path.read_text()
    listen = base.removeprefix("http://")
    path.write_text(text.replace(listen, "''"))  # start with the gateway off
    with LaunchedPipeline(path) as p:
        assert "gateway" not in {proc["name"] for proc in p.processes()}
        path.write_text(text)
        reply = p.control("reload", timeout=30)
        assert reply is not None and reply["ok"], reply
        assert f"gateway: the gateway restarts on {listen}" in reply["changes"]
        wait_up(base)
        assert curl(f"{base}/v1/events", json.dumps(event()))[0] == 200
        # a bad address is refused whole, one line; the running gateway stays
        path.write_text(text.replace(listen, "0.0.0.0:1"))
        refused = p.control("reload", timeout=30)
        assert refused is not None and not refused["ok"] and "set gateway.tls.cert" in refused["error"]
        assert curl(f"{base}/v1/events", json.dumps(event()))[0] == 200
