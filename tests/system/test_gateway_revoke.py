"""Gateway tokens while connections are open, against a launched pipeline with the real
CLI (`python -m nexus tokens create|revoke`): a revoked token ends its open /v1/stream and
/v1/subscribe connections (close 1008, a one-line reason), a narrowed grant applies to the
next event, and the gateway's log names tokens but never shows a token or a hash."""

from __future__ import annotations

import asyncio
import json
import re
import subprocess
import sys
import time
import urllib.request

import aiohttp
import pytest
from gateway_support import FULL, NARROW, READER, SLOW, event, gateway_config, wait_up

from nexus.gateway import tokens
from nexus.testing import LaunchedPipeline, wait_for

pytestmark = pytest.mark.system

RECV = 15.0  # seconds any one receive may take (the close is expected within ~2 s)


def cli(*args: str) -> str:
    """stdout of `python -m nexus tokens ...` (fails the test on a non-zero exit)."""
    out = subprocess.run(
        [sys.executable, "-m", "nexus", "tokens", *args], capture_output=True, text=True, timeout=60, check=False
    )
    assert out.returncode == 0, out.stderr
    return out.stdout


@pytest.fixture(scope="module")
def gw(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("gwtok")
    path, base = gateway_config(tmp)
    with LaunchedPipeline(path) as p:
        wait_up(base)
        yield p, base, str(tmp / "tokens.yaml")


def create(file: str, name: str, *grants: str) -> str:
    return cli("create", name, *grants, "--file", file).strip()


async def known(s: aiohttp.ClientSession, base: str, headers: dict) -> None:
    """Until the gateway takes a token just created (it re-reads the file within a second)."""

    async def up() -> bool:
        async with s.post(f"{base}/v1/events", json=event(), headers=headers) as r:
            return r.status == 200

    deadline = time.monotonic() + 10
    while not await up():
        assert time.monotonic() < deadline, "the created token was never accepted"
        await asyncio.sleep(0.1)  # (a poll's period)


async def next_ack(ws: aiohttp.ClientWebSocketResponse) -> dict:
    msg = await ws.receive(timeout=RECV)
    assert msg.type == aiohttp.WSMsgType.TEXT, msg
    return json.loads(msg.data)


async def closed(ws: aiohttp.ClientWebSocketResponse) -> tuple[int | None, str]:
    """(close code, reason) of the next message, which must be the server's close;
    event messages before it are skipped (a subscriber may get some)."""
    while True:
        msg = await ws.receive(timeout=RECV)
        if msg.type == aiohttp.WSMsgType.CLOSE:  # (its code: ws.close_code may say 1006 after)
            return msg.data, msg.extra or ""
        assert msg.type == aiohttp.WSMsgType.TEXT, msg


def test_revoke_ends_open_stream_and_subscribe(gw):
    _, base, file = gw
    token = create(file, "revokee", "--sources", "*", "--types", "test.*", "--subscribe", "test.*")
    ws_base = base.replace("http", "ws")
    headers = {"Authorization": f"Bearer {token}"}

    async def run() -> tuple[tuple, tuple, float]:
        async with aiohttp.ClientSession() as s:
            await known(s, base, headers)
            async with (
                s.ws_connect(f"{ws_base}/v1/stream", headers=headers) as stream,
                # the browser's way: the token as a subprotocol
                s.ws_connect(f"{ws_base}/v1/subscribe?types=test.*", protocols=("nexus.v1", f"bearer.{token}")) as sub,
            ):
                assert "first_seq" in await next_ack(sub)  # the start message
                await stream.send_str(json.dumps(event(id="before-revoke")))
                assert (await next_ack(stream))["status"] == "accepted"
                started = time.monotonic()
                await asyncio.to_thread(cli, "revoke", "revokee", "--file", file)
                got = await asyncio.gather(closed(stream), closed(sub))
                return got[0], got[1], time.monotonic() - started

    stream_close, sub_close, took = asyncio.run(run())
    print(f"revoke -> closes: stream {stream_close}, subscribe {sub_close}, after {took:.2f} s (CLI included)")
    for code, reason in (stream_close, sub_close):
        assert code == 1008  # policy violation
        assert reason.startswith("token revoked") and "\n" not in reason


def test_narrowed_grant_applies_to_the_next_event(gw):
    _, base, file = gw
    token = create(file, "narrowed", "--sources", "*", "--types", "test.*", "--subscribe", "test.*")
    ws_base = base.replace("http", "ws")
    headers = {"Authorization": f"Bearer {token}"}

    async def run() -> tuple[list[dict], tuple]:
        async with aiohttp.ClientSession(headers=headers) as s:
            await known(s, base, headers)
            async with s.ws_connect(f"{ws_base}/v1/stream") as stream:
                await stream.send_str(json.dumps(event(id="n-0")))
                acks = [await next_ack(stream)]
                async with s.ws_connect(f"{ws_base}/v1/subscribe?types=test.*") as sub:
                    assert "first_seq" in await next_ack(sub)
                    with tokens.editing(file) as entries:  # as an editor would: same token, fewer grants
                        entries["narrowed"] = tokens.TokenEntry(
                            hash=entries["narrowed"].hash, sources=["*"], types=["test.only.*"]
                        )
                    deadline = time.monotonic() + 10
                    while acks[-1]["status"] == "accepted":  # the stream stays open, each event checked
                        assert time.monotonic() < deadline, "the narrowed grant never applied"
                        await stream.send_str(json.dumps(event(id=f"n-{len(acks)}")))
                        acks.append(await next_ack(stream))
                    await stream.send_str(json.dumps(event("test.only.x", id="n-allowed")))
                    acks.append(await next_ack(stream))
                    return acks, await closed(sub)  # it may no longer subscribe at all

    acks, sub_close = asyncio.run(run())
    print(f"narrowed: {len(acks)} acks, the last two {acks[-2:]}; subscribe closed {sub_close}")
    assert acks[-2]["status"] == "rejected" and acks[-2]["reason"].startswith("forbidden")
    assert (acks[-1]["id"], acks[-1]["status"]) == ("n-allowed", "accepted")  # what it may still send
    assert sub_close[0] == 1008 and "may no longer subscribe" in sub_close[1]


def test_log_names_tokens_but_never_shows_one(gw):
    p, base, file = gw
    token = create(file, "logged", "--subscribe", "test.*")
    # (the gateway re-reads the file when a request authenticates: GET /metrics does)
    wait_for(lambda: poke(base) and "logged" in loaded_names(p.output()), 15, 0.1, "the new token's name logged")
    names = loaded_names(p.output())
    print(f"gateway_tokens_loaded names: {names}")
    assert {"full", "narrow", "slow", "reader", "logged"} <= set(names)
    entries = tokens.read(file)
    # a half-saved file whose parse error is next to a hash: the error line must not quote it
    with open(file, "rb") as f:
        good = f.read()
    with open(file, "wb") as f:
        f.write(good.replace(b"    hash: sha256:", b"    hash: half: sha256:", 1))  # YAML quotes this line
    try:
        wait_for(lambda: poke(base) and "gateway_tokens_unusable" in p.output(), 15, 0.1, "the broken file reported")
    finally:
        tokens.write(file, entries)
    text = p.output()
    print(next(line for line in text.splitlines() if "gateway_tokens_unusable" in line))
    secrets = [token, FULL, NARROW, SLOW, READER] + [e.hash for e in entries.values()]
    secrets += [e.hash.removeprefix("sha256:")[:16] for e in entries.values()]  # a part of one too
    assert not [s for s in secrets if s in text]


def loaded_names(text: str) -> list[str]:
    """The names of the last `gateway_tokens_loaded` line (structlog's console form)."""
    lines = [line for line in text.splitlines() if "gateway_tokens_loaded" in line]
    if not lines:
        return []
    m = re.search(r"\bnames=\[([^\]]*)\]", lines[-1])
    return re.findall(r"'([^']*)'", m.group(1)) if m else []


def poke(base: str) -> bool:
    """GET /metrics with a token (the gateway re-checks its tokens file); True."""
    req = urllib.request.Request(f"{base}/metrics", headers={"Authorization": f"Bearer {FULL}"})
    with urllib.request.urlopen(req, timeout=5) as resp:
        resp.read()
    return True
