"""System tests of /v1/subscribe (nexus/gateway/subscribe.py) against a launched pipeline:
the route is mounted on a small aiohttp app in the test process (the gateway process
mounts it the same way), with a real tokens file and a real aiohttp WebSocket client.
Catch-up from a seq then live events, the type glob, resuming with from=<last seq>
(nothing missed, nothing repeated, event by event), 401/403/400, and a client that stops
reading: it holds back only itself, and gets everything once it reads again."""

from __future__ import annotations

import asyncio
import json
import os
import sys
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import aiohttp
import pytest
from aiohttp import web
from conftest import write_config

from nexus import Producer
from nexus.config import Config
from nexus.gateway import subscribe, tokens
from nexus.testing import LaunchedPipeline, free_port

pytestmark = pytest.mark.system

RECV = 15.0  # seconds any one receive may take
TOKENS = {"reader": ["test.*"], "narrow": ["test.a*"], "sender": []}


def token_of(name: str) -> str:
    return f"nxg_test-{name}-token"


def write_tokens(path: Path) -> None:
    tokens.write(
        str(path),
        {
            name: tokens.TokenEntry(hash=tokens.hash_token(token_of(name)), types=["test.*"], subscribe=globs)
            for name, globs in TOKENS.items()
        },
    )


@asynccontextmanager
async def gateway(cfg: Config, tokens_path: Path) -> AsyncIterator[tuple[str, subscribe.Subscriptions]]:
    store = tokens.TokenStore(str(tokens_path))
    app = web.Application()
    subs = subscribe.add_routes(app, cfg, lambda request: store.authenticate(request.headers.get("Authorization")))
    runner = web.AppRunner(app)
    await runner.setup()
    port = free_port()
    await web.TCPSite(runner, "127.0.0.1", port).start()
    try:
        yield f"http://127.0.0.1:{port}/v1/subscribe", subs
    finally:
        await runner.cleanup()


def send(cfg: Config, items: list[tuple[str, dict]]) -> list[str]:
    """Events sent confirmed (journaled when this returns); their ids in order."""
    with Producer(cfg.confirm, source="subtest") as p:
        ids = [p.send(type_, payload) for type_, payload in items]
        p.flush(30)
    return ids


async def recv(ws: aiohttp.ClientWebSocketResponse) -> dict:
    msg = await ws.receive(timeout=RECV)
    assert msg.type == aiohttp.WSMsgType.TEXT, msg
    return json.loads(msg.data)


def auth(name: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token_of(name)}"}


@pytest.fixture
def pipeline(tmp_path):
    path = write_config(tmp_path)
    write_tokens(tmp_path / "tokens.yaml")
    with LaunchedPipeline(path) as p:
        yield p, tmp_path / "tokens.yaml"


def test_catch_up_live_glob_and_resume(pipeline):
    p, tokens_path = pipeline
    cfg = p.cfg

    async def main() -> None:
        a_ids: list[str] = []
        first = send(cfg, [(f"test.{'a' if i % 2 else 'b'}", {"i": i}) for i in range(20)])
        a_ids += first[1::2]
        async with gateway(cfg, tokens_path) as (url, subs), aiohttp.ClientSession() as http:
            # no `from`: from now on only
            async with http.ws_connect(f"{url}?types=test.a", headers=auth("reader")) as now_ws:
                hello = await recv(now_ws)
                assert hello["from"] == hello["last_seq"] >= 20 and hello["first_seq"] == 1 and "gap" not in hello
                later = send(cfg, [("test.a", {"i": 100}), ("test.b", {"i": 101})])
                got = await recv(now_ws)
                assert (got["id"], got["type"], got["payload"]) == (later[0], "test.a", {"i": 100})
                a_ids.append(later[0])

            # catch up from 0, then live: only test.a, in journal order
            received: list[dict] = []
            async with http.ws_connect(f"{url}?types=test.a&from=0", headers=auth("reader")) as ws:
                hello = await recv(ws)
                assert (hello["from"], hello["first_seq"], hello["types"]) == (0, 1, ["test.a"])
                while len(received) < len(a_ids):
                    received.append(await recv(ws))
                live = send(cfg, [(f"test.{'a' if i % 2 else 'b'}", {"i": 200 + i}) for i in range(10)])
                a_ids += live[1::2]
                for _ in range(3):  # part of the live ones; the connection drops here
                    received.append(await recv(ws))
            # sent while disconnected
            gone = send(cfg, [(f"test.{'a' if i % 2 else 'b'}", {"i": 300 + i}) for i in range(10)])
            a_ids += gone[1::2]
            last = received[-1]["seq"]
            async with http.ws_connect(f"{url}?types=test.a&from={last}", headers=auth("reader")) as ws:
                hello = await recv(ws)
                assert hello["from"] == last
                while len(received) < len(a_ids):
                    received.append(await recv(ws))
            ids = [m["id"] for m in received]
            seqs = [m["seq"] for m in received]
            lost = [i for i in a_ids if i not in set(ids)]
            dupes = len(ids) - len(set(ids))
            print(f"subscribe: sent test.a {len(a_ids)}, received {len(ids)}, lost {len(lost)}, duplicates {dupes}")
            assert ids == a_ids and not lost and dupes == 0  # event by event, in order
            assert seqs == sorted(seqs) and {m["type"] for m in received} == {"test.a"}

            # the example script prints the same stream, one JSON line per event
            script = Path(__file__).parents[2] / "examples" / "http" / "live-tail.py"
            args = ["--url", url, "--types", "test.a", "--from", "0", "--count", str(len(a_ids))]
            proc = await asyncio.create_subprocess_exec(
                sys.executable,
                str(script),
                *args,
                env={**os.environ, "NEXUS_TOKEN": token_of("reader")},
                stdout=asyncio.subprocess.PIPE,
            )
            try:
                out, _ = await asyncio.wait_for(proc.communicate(), 60)
            finally:
                if proc.returncode is None:
                    proc.kill()
                    await proc.wait()
            assert proc.returncode == 0
            assert [json.loads(line)["id"] for line in out.decode().splitlines()] == a_ids

    asyncio.run(main())


def test_refusals(pipeline):
    p, tokens_path = pipeline

    async def main() -> None:
        async with gateway(p.cfg, tokens_path) as (url, subs), aiohttp.ClientSession() as http:

            async def status(query: str, headers: dict[str, str]) -> tuple[int, dict]:
                ws_headers = {"Upgrade": "websocket", "Connection": "Upgrade", "Sec-WebSocket-Version": "13"}
                ws_headers["Sec-WebSocket-Key"] = "dGhlIHNhbXBsZSBub25jZQ=="
                async with http.get(f"{url}{query}", headers={**ws_headers, **headers}) as resp:
                    body = await resp.text()
                    return resp.status, (json.loads(body) if resp.status != 101 else {})

            assert (await status("?types=test.*", {}))[0] == 401
            code, body = await status("?types=test.*", {"Authorization": "Bearer nxg_wrong"})
            assert code == 401 and set(body) == {"error"} and "\n" not in body["error"]
            code, body = await status("?types=test.*", auth("sender"))
            assert code == 403 and "may not subscribe" in body["error"]
            code, body = await status("?types=test.*", auth("narrow"))
            assert code == 403 and "'test.*'" in body["error"]
            code, body = await status("?types=*", auth("reader"))
            assert code == 403
            code, body = await status("?types=test.a&from=-3", auth("reader"))
            assert code == 400 and body["error"].startswith("from:")
            code, body = await status("?types=,", auth("reader"))
            assert code == 400 and body["error"].startswith("types:")
            async with http.get(f"{url}?types=test.a", headers=auth("reader")) as resp:  # no upgrade
                assert resp.status == 400 and "WebSocket" in (await resp.json())["error"]
            # a browser's token, offered as a subprotocol (it cannot set headers)
            protocols = ("nexus.v1", f"bearer.{token_of('reader')}")
            async with http.ws_connect(f"{url}?types=test.a", protocols=protocols) as ws:
                assert ws.protocol == "nexus.v1" and "from" in await recv(ws)
            async with http.get(f"{url}?types=test.a", headers={"Sec-WebSocket-Protocol": "bearer.nope"}) as resp:
                assert resp.status == 401
            # a narrower glob than the token's is fine
            async with http.ws_connect(f"{url}?types=test.ab", headers=auth("narrow")) as ws:
                assert "from" in await recv(ws)
            assert subs.refused == {401: 3, 403: 3, 400: 3}

    asyncio.run(main())


def test_slow_client_holds_back_only_itself(pipeline):
    """A client that stops reading: the gateway stops reading the journal for it (its
    sends wait), the router and a second subscriber go on at full speed, and once it
    reads again it gets every event, in order, none skipped."""
    p, tokens_path = pipeline
    cfg = p.cfg
    n, pad = 3000, "x" * 8000  # 24 MB: more than the socket buffers between the two

    async def main() -> None:
        async with gateway(cfg, tokens_path) as (url, subs), aiohttp.ClientSession() as http:
            slow = await http.ws_connect(f"{url}?types=test.*&from=0", headers=auth("reader"))
            fast = await http.ws_connect(f"{url}?types=test.*&from=0", headers=auth("reader"))
            assert "from" in await recv(slow) and "from" in await recv(fast)
            sending = asyncio.create_task(
                asyncio.to_thread(send, cfg, [("test.s", {"i": i, "pad": pad}) for i in range(n)])
            )
            fast_got = [(await recv(fast))["payload"]["i"] for _ in range(n)]
            ids = await sending  # the router took all of them meanwhile (confirmed)
            assert fast_got == list(range(n)) and len(ids) == n
            sent = sorted(c.sent for c in subs.connections)
            held = sent[0]
            print(f"slow client: {held} of {n} events sent to it while it did not read; fast one: {sent[-1]}")
            assert held < n  # it stopped reading the journal for the slow client
            slow_got = [(await recv(slow))["payload"]["i"] for _ in range(n)]
            assert slow_got == list(range(n))  # nothing skipped, nothing repeated
            await slow.close()
            await fast.close()

    asyncio.run(main())
