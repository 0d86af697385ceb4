"""The CLI under `engine: nats` against a real nats-server: `nexus tail` reads the events
stream itself, `nexus journal verify` says it does not apply."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
import time

import msgspec

from nexus import config as config_mod
from nexus.jetstream import connect, setup
from nexus.protocol.events import encode, new_id
from nexus.testing import wait_for


def _config(tmp_path, url: str):
    from conftest import write_config

    path = write_config(tmp_path / "cfg", engine="nats", nats={"servers": [url], "stream": "CLI", "shards": 4})
    return path, config_mod.load(str(path))


def _event(type_: str, n: int) -> bytes:
    payload = msgspec.Raw(encode({"n": n}))
    return encode({"type": type_, "source": "t", "payload": payload, "id": new_id(), "time": time.time()})


def _nexus(*argv: str, **kw) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "nexus", *argv], stdout=subprocess.PIPE, text=True, **kw)


def test_tail_prints_new_events_matching_the_pattern(nats_node, tmp_path):
    path, cfg = _config(tmp_path, nats_node.urls[0])

    async def prepare():
        nc = await connect.connect(cfg, "test")
        names = await setup.ensure(nc.jetstream(), cfg, timeout=20)
        await nc.jetstream().publish(names.event_subject(0), _event("test.a", -1))  # before the tail: not shown
        await nc.close()
        return names

    async def consumers() -> int:
        nc = await connect.connect(cfg, "test")
        try:
            return (await nc.jetstream().stream_info("CLI")).state.consumer_count
        finally:
            await nc.close()

    async def publish(names):
        nc = await connect.connect(cfg, "test")
        js = nc.jetstream()
        for i, type_ in enumerate(["test.a", "test.b", "test.a"]):
            await js.publish(names.event_subject(i % 4), _event(type_, i))
        await js.publish(names.replay_subject("g", 0), _event("test.a", 99))  # one group's replay: not shown
        await js.publish(names.event_subject(3), _event("test.a", 3))
        await nc.close()

    names = asyncio.run(prepare())
    proc = _nexus("tail", "test.a", "-c", str(path), "--json", "--count", "3", "--seconds", "30")
    try:
        wait_for(lambda: asyncio.run(consumers()) >= 1, 20, 0.1, "the tail's consumer")
        asyncio.run(publish(names))
        out, _ = proc.communicate(timeout=30)
    finally:
        proc.kill()
        proc.wait()
    rows = [json.loads(line) for line in out.splitlines()]
    print("tail:", rows)
    assert [(r["type"], r["payload"]["n"]) for r in rows] == [("test.a", 0), ("test.a", 2), ("test.a", 3)]
    assert [r["seq"] for r in rows] == [2, 4, 6]


def test_journal_verify_does_not_apply(tmp_path):
    path, _ = _config(tmp_path, "nats://127.0.0.1:4222")
    proc = _nexus("journal", "verify", "-c", str(path))
    out, _ = proc.communicate(timeout=30)
    assert proc.returncode == 0
    assert out.strip() == "journal verify: not applicable under engine nats: JetStream checks its own store"


def test_tail_without_a_cluster_waits_and_says_so(tmp_path):
    from nexus.jetstream.localserver import free_ports

    path, _ = _config(tmp_path, f"nats://127.0.0.1:{free_ports(1)[0]}")
    proc = subprocess.run(
        [sys.executable, "-m", "nexus", "tail", "-c", str(path), "--seconds", "1"],
        capture_output=True,
        text=True,
        timeout=30,
    )
    print(proc.stderr)
    assert proc.returncode == 0 and proc.stdout == ""
    assert proc.stderr.startswith("nexus tail: waiting for the cluster at nats://127.0.0.1:")
    assert len(proc.stderr.strip().splitlines()) == 1  # once, no traceback


def test_dashboard_tail_reads_the_stream(nats_node, tmp_path):
    from nexus.http.tail import TailFeed

    _, cfg = _config(tmp_path, nats_node.urls[0])

    async def until(check, what: str, timeout: float = 20) -> None:
        deadline = time.monotonic() + timeout
        while not await check():
            assert time.monotonic() < deadline, what
            await asyncio.sleep(0.05)

    async def go():
        nc = await connect.connect(cfg, "test")
        js = nc.jetstream()
        names = await setup.ensure(js, cfg, timeout=20)
        feed = TailFeed(cfg, asyncio.get_running_loop())
        watcher = feed.watch("test.a")
        try:

            async def consumer_up():
                return (await js.stream_info("CLI")).state.consumer_count >= 1

            await until(consumer_up, "the tail's consumer")
            for i, type_ in enumerate(["test.a", "test.b", "test.a"]):
                await js.publish(names.event_subject(i % 4), _event(type_, i))
            lines: list[dict] = []

            async def two_lines():
                lines.extend(watcher.take())
                return len(lines) >= 2

            await until(two_lines, "two tail lines")
            print("dashboard tail:", lines)
            assert [(x["seq"], x["type"], json.loads(x["payload"])) for x in lines] == [
                (1, "test.a", {"n": 0}),
                (3, "test.a", {"n": 2}),
            ]
        finally:
            feed.close()
            await nc.close()
        assert feed.thread is None or not feed.thread.is_alive()

    asyncio.run(asyncio.wait_for(go(), 60))
