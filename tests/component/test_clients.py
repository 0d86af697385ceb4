"""The typed request clients (nexus/protocol/client.py) against a peer in a thread: what
each sends, the typed answer it returns, and the one error when no one answers."""

from __future__ import annotations

import threading
import time

import msgspec
import pytest
import zmq

from nexus.errors import ExitCode, NexusError, PeerError
from nexus.protocol import transport
from nexus.protocol.client import ControlClient, CoordClient
from nexus.protocol.wire import (
    ControlRequest,
    DlqRequest,
    Error,
    MemberExited,
    ReloadRequest,
    ReplayRequest,
    Reply,
    StatusRequest,
    control_decoder,
    coord_decoder,
    encoder,
)


class Peer:
    """A bound ROUTER in a thread: records each request's bytes and sends `answer(raw)`
    back (None: no answer)."""

    def __init__(self, endpoint: str, answer):
        self.sock = transport.bind(zmq.Context.instance(), zmq.ROUTER, endpoint, linger_ms=0)
        self.answer = answer
        self.seen: list[bytes] = []
        self.done = threading.Event()
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _serve(self) -> None:
        while not self.done.is_set():
            if not self.sock.poll(20):
                continue
            identity, raw = self.sock.recv_multipart()
            self.seen.append(raw)
            out = self.answer(raw)
            if out is not None:
                self.sock.send_multipart((identity, out))

    def close(self) -> None:
        self.done.set()
        self.thread.join(5)
        self.sock.close(0)


@pytest.fixture
def peer(tmp_path):
    made: list[Peer] = []

    def make(answer) -> tuple[Peer, str]:
        endpoint = f"ipc://{tmp_path}/peer-{len(made)}"
        made.append(Peer(endpoint, answer))
        return made[-1], endpoint

    yield make
    for p in made:
        p.close()


def test_coord_client_sends_each_request_and_returns_the_reply_data(peer):
    router, endpoint = peer(lambda raw: encoder.encode(Reply({"asked": type(coord_decoder.decode(raw)).__name__})))
    client = CoordClient(endpoint, 2.0)
    assert client.status() == {"asked": "StatusRequest"}
    assert client.replay("g", from_seq=5) == {"asked": "ReplayRequest"}
    assert client.dead_letters("purge", [1, 2], group="g") == {"asked": "DlqRequest"}
    assert client.reload(b"cfg") == {"asked": "ReloadRequest"}
    exited = MemberExited(group="g", member="g-0", exit_code=-9, reason="crashed", poison={0: [7]})
    assert client.member_exited(exited) == {"asked": "MemberExited"}
    assert [coord_decoder.decode(raw) for raw in router.seen] == [
        StatusRequest(),
        ReplayRequest(group="g", from_seq=5),
        DlqRequest(action="purge", ids=[1, 2], group="g"),
        ReloadRequest(config=b"cfg"),
        exited,
    ]


def test_coord_client_raises_the_routers_refusal(peer):
    _, endpoint = peer(lambda raw: encoder.encode(Error("the router is still reading its journal", "recovering")))
    with pytest.raises(NexusError, match=r"^router: the router is still reading its journal$") as err:
        CoordClient(endpoint, 2.0).status()
    assert not isinstance(err.value, PeerError)


def test_control_client_sends_control_requests_and_returns_the_reply_map(peer):
    def answer(raw: bytes) -> bytes:
        req = control_decoder.decode(raw)
        return msgspec.msgpack.encode({"ok": req.cmd != "stop", "cmd": req.cmd, "group": req.group, "n": req.n})

    launcher, endpoint = peer(answer)
    client = ControlClient(endpoint, 2.0)
    assert client.status() == {"ok": True, "cmd": "status", "group": "", "n": 0}
    assert client.scale("g", 3) == {"ok": True, "cmd": "scale", "group": "g", "n": 3}
    assert client.reload()["cmd"] == "reload"
    assert client.stop() == {"ok": False, "cmd": "stop", "group": "", "n": 0}  # refusals are the caller's
    assert client.reload(dry_run=True)["cmd"] == "reload"
    # the wire form: a plain msgpack map of the fields (dry_run came later: a launcher
    # before it skips the unknown key, and a request without it decodes as False)
    assert msgspec.msgpack.decode(launcher.seen[1]) == {"cmd": "scale", "group": "g", "n": 3, "dry_run": False}
    assert control_decoder.decode(msgspec.msgpack.encode({"cmd": "reload", "group": "", "n": 0})) == ControlRequest(
        "reload"
    )
    assert [control_decoder.decode(raw) for raw in launcher.seen] == [
        ControlRequest("status"),
        ControlRequest("scale", "g", 3),
        ControlRequest("reload"),
        ControlRequest("stop"),
        ControlRequest("reload", dry_run=True),
    ]


def test_no_answer_is_one_peer_error_with_exit_code_5(peer):
    _, endpoint = peer(lambda raw: None)  # bound, never answers
    started = time.monotonic()
    with pytest.raises(PeerError) as err:
        CoordClient(endpoint, 0.2).status()
    assert time.monotonic() - started >= 0.2
    assert str(err.value) == f"router at {endpoint} did not answer within 0.2s (is the pipeline running?)"
    assert err.value.exit_code == ExitCode.UNREACHABLE
    with pytest.raises(PeerError, match=r"launcher at .* did not answer within 0\.2s \(is `python -m nexus\.launch`"):
        ControlClient(endpoint, 0.2).status()
    with pytest.raises(PeerError, match=r"did not answer within 0\.05s"):
        CoordClient(endpoint, 3.0).status(timeout=0.05)  # a per-call timeout


def test_probe_fails_at_once_when_nothing_can_listen(tmp_path):
    endpoint = f"ipc://{tmp_path}/nobody"
    for client, who in (
        (CoordClient(endpoint, 3.0, probe=True, not_running_hint="; start it"), "router"),
        (ControlClient(endpoint, 3.0, probe=True), "launcher"),
    ):
        started = time.monotonic()
        with pytest.raises(PeerError) as err:
            client.status()
        assert time.monotonic() - started < 1.0
        assert str(err.value).startswith(f"{who} at {endpoint} is not running (no socket file ")
    assert str(err.value).endswith(")")  # no hint unless given
    with pytest.raises(PeerError, match=r"is not running \(no socket file .*\); start it$"):
        CoordClient(endpoint, 3.0, probe=True, not_running_hint="; start it").status()
