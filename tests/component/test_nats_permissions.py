"""deploy/nats/nats-server.conf's accounts, run for real: a nats-server started from that
file (its listen address moved to a free 127.0.0.1 port, its cluster block left out: one
node) lets user `nexus` create and fill the streams, and lets user `producer` only ask
the validated intake: a publish to an events subject and a JetStream API call are refused,
and nothing of it reaches the stream."""

from __future__ import annotations

import asyncio
import re
from pathlib import Path

import msgspec
import nats
import pytest
from nats.errors import NoRespondersError
from nats.errors import TimeoutError as NatsTimeout

from nexus import config as config_mod
from nexus.jetstream import setup
from nexus.jetstream.localserver import NatsNode, free_ports
from nexus.jetstream.names import Names

REPO = Path(__file__).resolve().parents[2]
CONF = REPO / "deploy" / "nats" / "nats-server.conf"
SECRETS = {"NEXUS_NATS_PASSWORD": "nexus-pw", "PRODUCER_NATS_PASSWORD": "producer-pw", "SYS_NATS_PASSWORD": "sys-pw"}


class DeployedNode(NatsNode):
    """A node whose config is the deploy file, with only its addresses and store moved."""

    def conf(self) -> str:
        text = CONF.read_text()
        text = re.sub(r"^cluster\s*\{.*?^\}\n", "", text, flags=re.MULTILINE | re.DOTALL)
        text = re.sub(r"^listen: \S+", f'listen: "{self.host}:{self.port}"', text, flags=re.MULTILINE)
        text = re.sub(r"^http: \S+", f'http: "{self.host}:{self.monitor_port}"', text, flags=re.MULTILINE)
        text = re.sub(r"store_dir: \S+", f'store_dir: "{self.store}/js"', text)
        assert "0.0.0.0" not in text and "cluster" not in re.sub(r"#.*", "", text)
        return text


@pytest.fixture
def deployed_node(tmp_path, monkeypatch):
    monkeypatch.setenv("NATS_SERVER_NAME", "nats-0")  # the server reads these from its environment
    for name, value in SECRETS.items():
        monkeypatch.setenv(name, value)
    client, monitor = free_ports(2)
    node = DeployedNode("nats-0", client, str(tmp_path / "nats"), monitor_port=monitor)
    try:
        node.start().wait_listening()
        yield node
    finally:
        node.stop()


def deployed_config(url: str, tmp_path: Path) -> config_mod.Config:
    """deploy/nats/nexus.yaml's nats section (its stream), on this one node."""
    (tmp_path / "nexus.yaml").write_text((REPO / "deploy" / "nats" / "nexus.yaml").read_text())
    cfg = config_mod.load(tmp_path / "nexus.yaml")
    nats_cfg = msgspec.structs.replace(cfg.nats, servers=[url], replicas=1, password=SECRETS["NEXUS_NATS_PASSWORD"])
    return msgspec.structs.replace(cfg, nats=nats_cfg)


def test_only_nexus_users_write_the_event_subjects(deployed_node, tmp_path):
    cfg = deployed_config(deployed_node.url, tmp_path)
    names = Names.of(cfg)

    async def scenario() -> None:
        refused = asyncio.Event()
        errors: list[str] = []

        async def on_error(exc: Exception) -> None:
            errors.append(str(exc))
            if "permissions violation" in str(exc).lower():
                refused.set()

        nexus = await nats.connect(deployed_node.url, user=cfg.nats.user, password=cfg.nats.password)
        producer = await nats.connect(
            deployed_node.url, user="producer", password=SECRETS["PRODUCER_NATS_PASSWORD"], error_cb=on_error
        )
        try:
            js = nexus.jetstream()
            await setup.ensure(js, cfg, timeout=20)

            # the intake: the ingest process (user nexus) answers requests to nexus.NEXUS.in
            async def answer(msg) -> None:
                await msg.respond(b"stored:" + msg.data)

            await nexus.subscribe(names.ingest_subject, queue=names.ingest_queue, cb=answer)
            await nexus.flush()
            reply = await producer.request(names.ingest_subject, b"event", timeout=5)
            assert reply.data == b"stored:event"
            assert not errors

            # a producer publishing straight to an events subject is refused by the server
            await producer.publish(names.event_subject(0), b"forged")
            await producer.flush(timeout=5)
            await asyncio.wait_for(refused.wait(), 5)
            assert names.event_subject(0).lower() in " ".join(errors)  # nats-py lowercases the text
            # ... and so is JetStream's API (it could purge, or read every group's cursor)
            with pytest.raises((NatsTimeout, NoRespondersError)):
                await producer.jetstream(timeout=1).stream_info(names.stream)
            info = await js.stream_info(names.stream)
            assert info.state.messages == 0, "the forged event reached the stream"

            # user nexus writes the events subjects (the ingest does, after validation)
            ack = await js.publish(names.event_subject(0), b"valid", headers={"Nats-Msg-Id": "e1"})
            assert ack.stream == names.stream and ack.seq == 1
            print(f"permissions: intake answered, forged publish refused ({len(errors)} error(s)), stream holds 1")
        finally:
            await producer.close()
            await nexus.close()

    asyncio.run(scenario())
