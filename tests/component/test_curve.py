"""Component tests of CURVE: a real Router (and members) in threads, real CURVE sockets
over tcp://127.0.0.1, keys written by pyzmq, the ZAP handler and the authorization."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import msgspec
import pytest
import yaml
import zmq
import zmq.auth
from conftest import recorder_group
from recorder import read_handled

from nexus import NexusError, PeerError, Producer, RejectedError, config
from nexus.errors import ConfigError
from nexus.protocol import transport
from nexus.protocol.client import CoordClient
from nexus.protocol.curve import ClientKeys, load_pair
from nexus.protocol.wire import (
    Error,
    Join,
    Journaled,
    ProducerBatch,
    ProducerReply,
    Read,
    coord_reply_decoder,
    encoder,
    journaled_decoder,
)
from nexus.testing import free_port, wait_for

PRODUCER = {"role": "producer", "sources": ["comp*"], "types": ["test.*"]}
MEMBER = {"role": "member", "groups": ["rec"]}


class Keys:
    """A key folder for a test: the router's pair, clients' pairs, the authorized dir."""

    def __init__(self, root: Path):
        self.root = root
        self.authorized = root / "authorized"
        self.authorized.mkdir(parents=True)
        _, self.server_secret = zmq.auth.create_certificates(str(root), "router")
        os.chmod(self.server_secret, 0o600)  # as `nexus keys generate` writes it
        self.server_public = load_pair(self.server_secret, "server").public

    def client(self, name: str, grant: dict | None = None, server: bytes | None = None) -> ClientKeys:
        """A new key pair NAME; authorized with `grant` when given."""
        public, secret = zmq.auth.create_certificates(str(self.root), name)
        os.chmod(secret, 0o600)  # as `nexus keys generate` writes it
        if grant is not None:
            self.authorize(name, grant)
        return ClientKeys(load_pair(secret, name), server or self.server_public)

    def authorize(self, name: str, grant: dict) -> None:
        (self.authorized / f"{name}.yaml").write_text(yaml.safe_dump(grant))
        shutil.copy(self.root / f"{name}.key", self.authorized / f"{name}.key")

    def revoke(self, name: str) -> None:
        (self.authorized / f"{name}.key").unlink()
        (self.authorized / f"{name}.yaml").unlink()

    def secret_file(self, name: str) -> str:
        return str(self.root / f"{name}.key_secret")


def tcp() -> str:
    return f"tcp://127.0.0.1:{free_port()}"


@pytest.fixture
def keys(tmp_path):
    return Keys(tmp_path / "keys")


@pytest.fixture
def secured(tmp_path, config_factory, components, keys):
    """A router with every endpoint on tcp://127.0.0.1 and CURVE on; returns (cfg, router)."""
    out = tmp_path / "out"
    path = config_factory(
        router={"ingest": tcp(), "confirm": tcp(), "publish": tcp(), "coord": tcp()},
        workers={"rec": recorder_group(out)},
        security={
            "curve": {"secret_key_file": keys.server_secret, "authorized_keys_dir": str(keys.authorized)},
        },
    )
    cfg = config.load(path)
    router = components.router(cfg)
    wait_for(lambda: router.gatekeeper is not None and transport.unreachable(cfg.confirm) is None, 10)
    return cfg, router, out


def member_config(cfg: config.Config, keys: Keys, name: str) -> config.Config:
    """The config a member on another host would have: its own key and the router's (and
    a short stop: a revoked one cannot say goodbye)."""
    curve = config.CurveConfig(secret_key_file=keys.secret_file(name), server_key=keys.server_public.decode())
    security = config.SecurityConfig(curve=curve)
    return msgspec.structs.replace(cfg, security=security, shutdown_timeout=config.Duration(3))


def refused(router, reason: str) -> int:
    return router.gatekeeper.refused[reason]


def test_authorized_producer_and_member_end_to_end(secured, components, keys):
    cfg, router, out = secured
    prod = keys.client("prod", PRODUCER)
    keys.client("worker", MEMBER)
    wait_for(lambda: "worker" in router.gatekeeper.keys.by_name, 5, message="keys re-scanned")
    components.member(member_config(cfg, keys, "worker"), "rec", "rec-0")
    with Producer(cfg.confirm, source="comp", curve=prod) as p:
        sent = [p.send("test.item", {"i": i}, key=f"k{i % 7}") for i in range(500)]
        p.flush(20)
    with Producer(cfg.ingest, source="comp-fire", confirm=False, curve=prod) as p:
        sent += [p.send("test.fire", {"i": i}) for i in range(100)]
        p.flush(10)
    wait_for(lambda: len(read_handled(str(out))) == 600, 20, message="600 handled")
    assert {r[1] for r in read_handled(str(out))} == set(sent)
    assert router.intake.accepted_total == 600
    assert sum(n for reason, n in router.gatekeeper.refused.items() if reason != "incomplete") == 0
    status = CoordClient(cfg.coord, curve=prod).status()
    assert status["router"]["security"]["curve"] is True
    assert status["router"]["security"]["authorized_keys"] == 2


@pytest.mark.parametrize(
    ("how", "reason"),
    [("unknown key", "unknown_key"), ("NULL client", "null_client"), ("wrong server key", "wrong_server_key")],
)
def test_unauthorized_clients_are_refused_and_counted(secured, keys, how, reason):
    cfg, router, _ = secured
    if how == "unknown key":
        curve = keys.client("stranger")  # a valid pair, not in the authorized folder
    elif how == "NULL client":
        curve = None
    else:
        _, other_secret = zmq.auth.create_certificates(str(keys.root), "fake-router")
        os.chmod(other_secret, 0o600)
        curve = keys.client("prod", PRODUCER, server=load_pair(other_secret, "fake").public)
    p = Producer(cfg.confirm, source="comp", curve=curve)
    try:
        p.send("test.item", {"i": 1})
        with pytest.raises(PeerError, match="did not confirm"):
            p.flush(1.5)
    finally:
        _close_quietly(p)
    # (a NULL client that hangs up first is seen as an incomplete handshake: a race)
    also = "incomplete" if reason == "null_client" else reason
    wait_for(lambda: refused(router, reason) + refused(router, also) >= 1, 5, message=f"{reason} counted")
    assert router.intake.accepted_total == 0
    with pytest.raises(PeerError):  # nor may it ask anything on coord
        CoordClient(cfg.coord, 0.5, curve=curve).status()


def _close_quietly(p: Producer) -> None:
    try:
        p.close(0)
    except NexusError:
        pass  # unconfirmed events: what the test is about


def test_a_key_added_is_accepted_without_a_restart(secured, keys):
    cfg, router, _ = secured
    late = keys.client("late")
    p = Producer(cfg.confirm, source="comp", curve=late)
    p.send("test.item", {"i": 1})
    wait_for(lambda: refused(router, "unknown_key") >= 1, 5, message="refused before it is authorized")
    _close_quietly(p)  # (libzmq does not retry a handshake the server refused)
    keys.authorize("late", PRODUCER)
    wait_for(lambda: "late" in router.gatekeeper.keys.by_name, 5, message="folder re-scanned")
    with Producer(cfg.confirm, source="comp", curve=late) as p:
        p.send("test.item", {"i": 1})
        p.flush(10)
    assert router.intake.accepted_total == 1


def test_a_revoked_producer_is_refused_and_disconnected(secured, keys):
    cfg, router, _ = secured
    prod = keys.client("prod", PRODUCER)
    wait_for(lambda: "prod" in router.gatekeeper.keys.by_name, 5)
    p = Producer(cfg.confirm, source="comp", curve=prod, ack_timeout=0.5)
    try:
        p.send("test.item", {"i": 1})
        p.flush(10)
        keys.revoke("prod")
        # its connection is closed, and its reconnect is refused as an unknown key
        wait_for(lambda: refused(router, "unknown_key") >= 1, 10, message="revoked key's reconnect refused")
        p.send("test.item", {"i": 2})
        with pytest.raises((PeerError, RejectedError)):
            p.flush(2)
    finally:
        _close_quietly(p)
    assert router.intake.accepted_total == 1


def test_a_revoked_member_stops_receiving(secured, components, keys):
    cfg, router, out = secured
    prod = keys.client("prod", PRODUCER)
    keys.client("worker", MEMBER)
    wait_for(lambda: "worker" in router.gatekeeper.keys.by_name, 5)
    components.member(member_config(cfg, keys, "worker"), "rec", "rec-0")
    with Producer(cfg.confirm, source="comp", curve=prod) as p:
        p.send("test.item", {"i": 1})
        p.flush(10)
        wait_for(lambda: len(read_handled(str(out))) == 1, 10, message="first event handled")
        keys.revoke("worker")
        wait_for(lambda: refused(router, "unknown_key") >= 1, 10, message="revoked member's reconnect refused")
        wait_for(lambda: not router.coordinator.groups["rec"].members, 10, message="member dropped")
        for i in range(50):
            p.send("test.item", {"i": i})
        p.flush(10)
    # the events are journaled, and nothing reaches the revoked member: not live, not fetched
    with pytest.raises(TimeoutError):
        wait_for(lambda: len(read_handled(str(out))) > 1, 2)
    assert router.intake.accepted_total == 51


def test_events_outside_the_keys_sources_and_types_are_nacked_forbidden(secured, keys):
    cfg, router, _ = secured
    prod = keys.client("prod", PRODUCER)
    wait_for(lambda: "prod" in router.gatekeeper.keys.by_name, 5)
    for source, type_ in (("mail", "test.item"), ("comp", "nexus.heartbeat")):
        with Producer(cfg.confirm, source=source, curve=prod) as p:
            p.send(type_, {"i": 1})
            with pytest.raises(RejectedError, match="forbidden: key prod may not send"):
                p.flush(10)
    assert router.intake.rejected["forbidden"] == 2
    assert router.intake.accepted_total == 0


def _coord(cfg, curve: ClientKeys, msg, identity: bytes = b"t") -> object:
    ctx = zmq.Context.instance()
    sock = transport.connect(ctx, zmq.DEALER, cfg.coord, identity=identity, curve=curve, linger_ms=0)
    try:
        sock.send(encoder.encode(msg))
        assert sock.poll(5000), "no answer on coord"
        return coord_reply_decoder.decode(sock.recv())
    finally:
        sock.close(0)


def test_a_member_key_may_join_only_its_groups(tmp_path, config_factory, components, keys):
    out = tmp_path / "out"
    path = config_factory(
        router={"ingest": tcp(), "confirm": tcp(), "publish": tcp(), "coord": tcp()},
        workers={"rec": recorder_group(out), "other": recorder_group(tmp_path / "other")},
        security={"curve": {"secret_key_file": keys.server_secret, "authorized_keys_dir": str(keys.authorized)}},
    )
    cfg = config.load(path)
    worker = keys.client("worker", MEMBER)
    router = components.router(cfg)
    wait_for(lambda: router.gatekeeper is not None and "worker" in router.gatekeeper.keys.by_name, 10)
    answer = _coord(cfg, worker, Join(group="other", member="intruder"))
    assert isinstance(answer, Error) and answer.code == "forbidden"
    assert "may not join group 'other'" in answer.reason
    assert router.gatekeeper.forbidden["group"] == 1
    assert not router.coordinator.groups["other"].members


def test_admin_requests_need_an_admin_key(secured, keys):
    cfg, router, _ = secured
    worker = keys.client("worker", MEMBER)
    admin = keys.client("ops", {"role": "admin"})
    wait_for(lambda: "ops" in router.gatekeeper.keys.by_name, 5)
    member_client = CoordClient(cfg.coord, curve=worker)
    assert member_client.status()["router"]["security"]["curve"]  # status: any key
    for ask in (
        member_client.reload,
        lambda: member_client.dead_letters("replay", all=True),
        lambda: member_client.replay("rec"),
    ):
        with pytest.raises(NexusError, match="forbidden: .* needs an admin key; worker is a member key"):
            ask()
    assert router.gatekeeper.forbidden["admin"] == 3
    assert "error" not in CoordClient(cfg.coord, curve=admin).dead_letters("list")


def test_reading_the_journal_needs_an_admin_key(secured, keys):
    """The gateway's /v1/subscribe reads with `Read`: any event type, so admin only."""
    cfg, router, _ = secured
    worker = keys.client("worker", MEMBER)
    admin = keys.client("ops", {"role": "admin"})
    wait_for(lambda: "ops" in router.gatekeeper.keys.by_name, 5)
    denied = _coord(cfg, worker, Read(after=0))
    assert isinstance(denied, Error) and denied.code == "forbidden" and "needs an admin key" in denied.reason
    assert router.gatekeeper.forbidden["admin"] == 1
    sock = transport.connect(zmq.Context.instance(), zmq.DEALER, cfg.coord, curve=admin, linger_ms=0)
    try:
        sock.send(encoder.encode(Read(after=0, types=["test.*"])))
        assert sock.poll(5000), "no answer on coord"
        answer = journaled_decoder.decode(sock.recv())
    finally:
        sock.close(0)
    assert isinstance(answer, Journaled) and answer.upto == answer.last


def test_a_producer_id_belongs_to_the_key_that_first_used_it(secured, keys):
    cfg, router, _ = secured
    first, second = keys.client("prod", PRODUCER), keys.client("prod2", PRODUCER)
    wait_for(lambda: "prod2" in router.gatekeeper.keys.by_name, 5)
    event = msgspec.msgpack.encode(
        {"type": "test.item", "source": "comp", "payload": {}, "id": "01J0000000000000000000000E", "time": 1.0}
    )

    def send(curve: ClientKeys, seq: int) -> ProducerReply:
        sock = transport.connect(zmq.Context.instance(), zmq.DEALER, cfg.confirm, curve=curve, linger_ms=0)
        try:
            sock.send(encoder.encode(ProducerBatch([msgspec.Raw(event)], "shared-id", seq)))
            assert sock.poll(5000)
            return msgspec.msgpack.decode(sock.recv(), type=ProducerReply)
        finally:
            sock.close(0)

    assert send(first, 1).ack == 1
    stolen = send(second, 2)
    assert stolen.error.startswith("forbidden: producer id shared-id belongs to another key")
    assert send(first, 2).ack == 2  # its owner goes on
    assert router.intake.accepted_total == 2


def test_a_bind_other_hosts_reach_needs_curve_or_insecure(tmp_path, config_factory):
    from nexus.router.server import Router

    path = config_factory(router={"ingest": f"tcp://0.0.0.0:{free_port()}"})
    with pytest.raises(ConfigError, match=r"router.ingest: tcp://0.0.0.0:\d+ is reachable from other hosts"):
        Router(config.load(path))
    path = config_factory(router={"ingest": f"tcp://0.0.0.0:{free_port()}"}, security={"insecure": True})
    Router(config.load(path))  # allowed, with a warning
    assert os.path.exists(path)


def test_a_secret_key_file_others_can_read_is_refused(tmp_path):
    _, secret = zmq.auth.create_certificates(str(tmp_path), "loose")
    os.chmod(secret, 0o644)
    with pytest.raises(ConfigError) as err:
        load_pair(secret, "security.curve.secret_key_file")
    assert f"{secret} is readable by others (mode 0644): chmod 600" in str(err.value)
    os.chmod(secret, 0o600)
    assert load_pair(secret, "security.curve.secret_key_file").public


# -- review findings: fd exhaustion, the key folder's owner, handshake timeout ---------------
def test_a_connection_that_never_handshakes_is_dropped(secured):
    """A peer without a key that connects and says nothing holds a file descriptor only
    for HANDSHAKE_MS, not libzmq's 30 s default."""
    import socket
    import time

    from nexus.protocol.curve import HANDSHAKE_MS

    cfg, _, _ = secured
    host, port = cfg.confirm[len("tcp://") :].rsplit(":", 1)
    idle = socket.create_connection((host, int(port)), timeout=5)
    t0 = time.monotonic()
    idle.settimeout(HANDSHAKE_MS / 1000 + 10)
    try:
        while idle.recv(4096):  # the server's greeting, then nothing; b"" when it closes
            pass
    except ConnectionResetError:
        pass
    finally:
        idle.close()
    assert time.monotonic() - t0 < HANDSHAKE_MS / 1000 + 5


def test_a_passing_read_error_keeps_every_key(tmp_path, monkeypatch):
    """Out of file descriptors while the folder is re-read: nothing is revoked, and the
    next readable scan goes on as usual."""
    import errno

    from nexus.protocol import gatekeeper

    keys = Keys(tmp_path / "keys")
    keys.client("prod", PRODUCER)
    ring = gatekeeper.KeyRing(str(keys.authorized), load_pair(keys.server_secret, "server"))
    ring.scan()
    assert "prod" in ring.by_name
    keys.client("other", PRODUCER)  # the folder changed: the next scan reads it

    def no_fds(path):
        raise OSError(errno.EMFILE, "Too many open files")

    monkeypatch.setattr(gatekeeper.os, "listdir", no_fds)
    assert ring.scan() == set() and "prod" in ring.by_name  # kept, nothing revoked
    monkeypatch.undo()
    assert ring.scan() == set() and {"prod", "other"} <= set(ring.by_name)


def test_a_key_folder_others_can_write_is_refused_and_foreign_files_ignored(tmp_path):
    from nexus.protocol import gatekeeper

    keys = Keys(tmp_path / "keys")
    own = load_pair(keys.server_secret, "server")
    os.chmod(keys.authorized, 0o777)
    with pytest.raises(ConfigError, match=r"authorized_keys_dir: .* is writable by others \(mode 0777"):
        gatekeeper.KeyRing(str(keys.authorized), own)
    os.chmod(keys.authorized, 0o700)
    keys.client("prod", PRODUCER)
    keys.client("loose", PRODUCER)
    os.chmod(keys.authorized / "loose.yaml", 0o666)  # anyone could grant it more
    ring = gatekeeper.KeyRing(str(keys.authorized), own)
    ring.scan()
    assert "prod" in ring.by_name and "loose" not in ring.by_name


def test_the_router_raises_its_open_file_limit():
    import resource

    from nexus.common.process import raise_fd_limit

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    try:
        resource.setrlimit(resource.RLIMIT_NOFILE, (min(256, hard), hard))
        now = raise_fd_limit()
        assert now == resource.getrlimit(resource.RLIMIT_NOFILE)[0] and now > 256
    finally:
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))


def test_a_tail_that_goes_away_is_no_longer_counted(secured, keys):
    """libzmq's unsubscriptions for a subscriber that disconnected carry no key: they
    apply (else the router encodes tail deliveries for nobody, forever)."""
    from nexus.protocol.wire import TAIL_TOPIC

    cfg, router, _ = secured
    admin = keys.client("ops", {"role": "admin"})
    wait_for(lambda: "ops" in router.gatekeeper.keys.by_name, 10, message="the new key loaded")
    ctx = zmq.Context()
    try:
        sub = transport.subscriber(ctx, cfg.publish, curve=admin)
        sub.setsockopt(zmq.SUBSCRIBE, TAIL_TOPIC)
        wait_for(lambda: router.tail_subscribers == 1, 10, message="the admin's tail counted")
        sub.close(0)
        wait_for(lambda: router.tail_subscribers == 0, 10, message="the closed tail no longer counted")
    finally:
        ctx.destroy(linger=0)
