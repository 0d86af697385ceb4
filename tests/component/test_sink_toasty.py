"""workers.toasty against a real Toasty server (`python -m nexus.tools.toasty`) in another process."""

from __future__ import annotations

import asyncio
import queue
import time
from pathlib import Path

import grpc
import pytest
import structlog
from structlog.testing import capture_logs
from tlscerts import TestPKI
from toasty_server import ToastyProcess

from nexus.contracts import EmailReceived, ParrotEmailData, ParrotNotification
from nexus.errors import ConfigError
from nexus.member.context import Context
from nexus.proto.toasty.v1 import toasty_pb2 as pb
from nexus.proto.toasty.v1 import toasty_pb2_grpc as pb_grpc
from nexus.protocol.events import Event, new_id
from nexus.testing import free_port, wait_for
from nexus.tools.toasty import ServerTls, serve
from nexus.tools.toasty import main as toasty_main
from workers.mapping import TemplateError
from workers.toasty import Toasty, ToastyError, ToastyUnavailable, target_host

REPO = Path(__file__).resolve().parents[2]
DEADLINE = 10.0


@pytest.fixture
def toasty_factory():
    procs: list[ToastyProcess] = []

    def start(*args: str, port: int = 0) -> ToastyProcess:
        procs.append(ToastyProcess(*args, port=port))
        return procs[-1]

    yield start
    for p in procs:
        p.stop()


@pytest.fixture
def toasty(toasty_factory):
    return toasty_factory()


def ctx_for(ev: Event) -> Context:
    return Context(
        group="g",
        member="m",
        attempt=1,
        redelivered=False,
        seq=1,
        partition=0,
        options={},
        base_log=structlog.get_logger(),
        emit=None,
        event_id=ev.id,
        correlation_id=None,
    )


def email_event(**kw) -> Event:
    payload = EmailReceived(
        account="work",
        mailbox="INBOX",
        uid=7,
        uidvalidity=1,
        from_="Ada <ada@example.com>",
        to=["me@example.com"],
        subject="Lunch?",
        snippet="Are you free at noon?",
    )
    return Event(type="email.received", source="imap:work", payload=payload, id=new_id(), time=time.time(), **kw)


def parrot_event() -> Event:
    payload = ParrotNotification(
        app_id="outlook",
        app_name="Outlook",
        title="New mail",
        body="Quarterly report",
        notification_type="email",
        received_at=time.time(),
        email_data=ParrotEmailData(sender="boss@example.com", subject="Quarterly report"),
    )
    return Event(type="parrot.notification", source="parrot", payload=payload, id=new_id(), time=time.time())


def run(handler: Toasty, *events: Event) -> None:
    """Handle events in order on one loop (one channel), then close the handler."""

    async def main():
        try:
            for ev in events:
                await asyncio.wait_for(handler.handle(ev, ctx_for(ev)), DEADLINE)
        finally:
            await handler.close()

    asyncio.run(main())


def test_email_is_notified_with_ids(toasty):
    ev = email_event(correlation_id="corr-1")
    run(Toasty({"target": toasty.target}), ev)
    note = toasty.next_notification()
    assert note == {
        "id": "n1",
        "app": "nexus",
        "urgency": "NORMAL",
        "title": "Ada <ada@example.com>",
        "body": "Lunch?",
        "tag": "",
        "event_id": ev.id,
        "correlation_id": "corr-1",
    }


def test_parrot_and_catch_all_defaults(toasty):
    other = Event(type="test.thing", source="cli", payload={"x": 1}, id=new_id(), time=time.time())
    run(Toasty({"target": toasty.target, "app": "desk", "urgency": "low"}), parrot_event(), other)
    first, second = toasty.next_notification(), toasty.next_notification()
    assert (first["title"], first["body"], first["app"], first["urgency"]) == (
        "Outlook: New mail",
        "Quarterly report",
        "desk",
        "LOW",
    )
    assert (second["title"], second["body"], second["event_id"]) == ("test.thing", "cli", other.id)


def test_custom_mapping_first_match_wins(toasty):
    mapping = {
        "email.*": {
            "title": "Mail for {payload.account}: {payload.subject}",
            "body": "{payload.from_} via {event.source} (p{event.priority:02d}) to {payload.to.0}",
            "urgency": "critical",
            "tag": "{payload.mailbox}",
        },
        "*": {"title": "never", "body": "used"},
    }
    run(Toasty({"target": toasty.target, "mapping": mapping}), email_event())
    note = toasty.next_notification()
    assert note["title"] == "Mail for work: Lunch?"
    assert note["body"] == "Ada <ada@example.com> via imap:work (p05) to me@example.com"
    assert (note["urgency"], note["tag"], note["correlation_id"]) == ("CRITICAL", "INBOX", "")


def test_unmatched_type_is_skipped_without_a_call():
    # Nothing listens on the target: any call would fail, so returning proves no call was made.
    handler = Toasty(
        {
            "target": f"127.0.0.1:{free_port()}",
            "timeout": 1,
            "mapping": {"parrot.*": {"title": "{payload.title}", "body": ""}},
        }
    )
    assert handler.notification(email_event()) is None
    run(handler, email_event())


def test_server_down_raises_unavailable():
    handler = Toasty({"target": f"127.0.0.1:{free_port()}", "timeout": 2})
    with pytest.raises(ToastyError) as info:
        run(handler, email_event())
    assert info.value.code == grpc.StatusCode.UNAVAILABLE
    assert "Notify failed: UNAVAILABLE" in str(info.value)


def test_recovers_soon_after_the_server_comes_back(toasty_factory):
    port = free_port()
    handler = Toasty({"target": f"127.0.0.1:{port}", "timeout": 2})
    ev = email_event()

    async def main():
        with pytest.raises(ToastyError):
            await asyncio.wait_for(handler.handle(ev, ctx_for(ev)), DEADLINE)
        server = toasty_factory(port=port)
        # Retry as the runtime would, until a deadline: the channel must reconnect well
        # within it (gRPC's default reconnect backoff could keep it failing for minutes).
        deadline = asyncio.get_running_loop().time() + DEADLINE
        while True:
            try:
                await asyncio.wait_for(handler.handle(ev, ctx_for(ev)), DEADLINE)
                break
            except ToastyError:
                if asyncio.get_running_loop().time() > deadline:
                    raise
                await asyncio.sleep(0.05)
        await handler.close()
        return server

    server = asyncio.run(main())
    assert server.next_notification()["event_id"] == ev.id


def test_fail_first_then_success(toasty_factory):
    server = toasty_factory("--fail-first", "2")
    handler = Toasty({"target": server.target})
    ev = email_event()
    outcomes: list[str] = []

    async def main():
        for _ in range(3):  # what the runtime's retries do, without the backoff
            try:
                await asyncio.wait_for(handler.handle(ev, ctx_for(ev)), DEADLINE)
                outcomes.append("ok")
            except ToastyError as exc:
                outcomes.append(exc.code.name)
        await handler.close()

    asyncio.run(main())
    assert outcomes == ["UNAVAILABLE", "UNAVAILABLE", "ok"]
    note = server.next_notification()
    assert (note["id"], note["event_id"]) == ("n1", ev.id)


def test_health(toasty):
    with grpc.insecure_channel(toasty.target) as channel:
        reply = pb_grpc.ToastyStub(channel).Health(pb.HealthRequest(), timeout=DEADLINE)
    assert reply.status == pb.HealthReply.SERVING

    async def probe(target):
        handler = Toasty({"target": target, "timeout": 2})
        try:
            return await handler.health()
        finally:
            await handler.close()

    assert asyncio.run(probe(toasty.target)) is True
    assert asyncio.run(probe(f"127.0.0.1:{free_port()}")) is False


def test_sigterm_stops_cleanly(toasty):
    assert toasty.stop() == 0


def test_missing_template_field_is_a_handler_error(toasty):
    handler = Toasty({"target": toasty.target, "mapping": {"*": {"title": "{payload.subjcet}", "body": ""}}})
    with pytest.raises(TemplateError, match=r"payload.subjcet not found \(available: .*subject"):
        run(handler, email_event())


@pytest.mark.parametrize(
    "options, message",
    [
        ({"mapping": {"*": {"title": "{payload[from]}", "body": ""}}}, "use dotted paths"),
        ({"mapping": {"*": {"title": "{ctx.group}", "body": ""}}}, "starting with one of payload, event"),
        ({"mapping": {"*": {"title": "{payload.x", "body": ""}}}, "expected '}'"),
        ({"mapping": {"*": {"title": "t", "bdy": ""}}}, "bdy"),
        ({"urgency": "loud"}, "urgency"),
        ({"mapping": {}}, "mapping is empty"),
    ],
)
def test_bad_options_fail_at_start(options, message):
    with pytest.raises(ConfigError, match=message):
        Toasty(options)


def test_embedded_server_calls_back():
    got: list[tuple[pb.Notification, str]] = []
    server, port = serve("127.0.0.1:0", lambda note, nid: got.append((note, nid)))
    try:
        ev = email_event()
        run(Toasty({"target": f"127.0.0.1:{port}"}), ev)
        wait_for(lambda: got, DEADLINE, message="notification")  # the callback ran before the reply
        assert (got[0][0].event_id, got[0][1]) == (ev.id, "n1")
    finally:
        server.stop(None).wait(DEADLINE)


# -- TLS (issue 12, point 6) -------------------------------------------------------------
@pytest.fixture(scope="module")
def pki(tmp_path_factory):
    return TestPKI(tmp_path_factory.mktemp("pki"))


@pytest.fixture(scope="module")
def other_pki(tmp_path_factory):
    return TestPKI(tmp_path_factory.mktemp("other-pki"), name="Some Other CA")


def tls_server(toasty_factory, pki, client_ca=None) -> ToastyProcess:
    args = ["--tls-cert", str(pki.server_cert), "--tls-key", str(pki.server_key)]
    return toasty_factory(*args, *(["--client-ca", str(client_ca)] if client_ca else []))


def test_tls_end_to_end(toasty_factory, pki):
    server = tls_server(toasty_factory, pki)
    ev = email_event()
    run(Toasty({"target": server.target, "tls": {"ca_file": str(pki.ca)}}), ev)
    assert server.next_notification()["event_id"] == ev.id
    # the name checked can differ from the target's host (the cert names localhost too)
    ev2 = email_event()
    run(Toasty({"target": server.target, "tls": {"ca_file": str(pki.ca), "server_name": "localhost"}}), ev2)
    assert server.next_notification()["event_id"] == ev2.id


def test_tls_server_refuses_a_plaintext_client(toasty_factory, pki):
    server = tls_server(toasty_factory, pki)
    with pytest.raises(ToastyUnavailable):
        run(Toasty({"target": server.target, "timeout": 2}), email_event())


@pytest.mark.parametrize(
    "tls, reason",
    [
        ("other_ca", "a certificate from another CA"),
        ("wrong_name", "a server_name the certificate does not hold"),
    ],
)
def test_tls_untrusted_server_is_refused_with_one_line(toasty_factory, pki, other_pki, tls, reason):
    server = tls_server(toasty_factory, pki)
    options = {"ca_file": str(other_pki.ca)} if tls == "other_ca" else {"ca_file": str(pki.ca), "server_name": "x.lan"}
    with pytest.raises(ToastyUnavailable) as info:  # circuit breaker: events wait, none dead-lettered
        run(Toasty({"target": server.target, "timeout": 3, "tls": options}), email_event())
    message = str(info.value)
    assert "\n" not in message and info.value.code == grpc.StatusCode.UNAVAILABLE, reason
    assert f"toasty {server.target}: Notify failed: UNAVAILABLE: TLS handshake failed" in message, message
    with pytest.raises(queue.Empty):
        server.lines.get(timeout=0.2)  # nothing was delivered


def test_tls_client_certificate_required_by_the_server(toasty_factory, pki):
    server = tls_server(toasty_factory, pki, client_ca=pki.ca)
    ev = email_event()
    with_cert = {"ca_file": str(pki.ca), "cert_file": str(pki.client_cert), "key_file": str(pki.client_key)}
    run(Toasty({"target": server.target, "tls": with_cert}), ev)
    assert server.next_notification()["event_id"] == ev.id
    with pytest.raises(ToastyUnavailable) as info:
        run(Toasty({"target": server.target, "timeout": 3, "tls": {"ca_file": str(pki.ca)}}), email_event())
    message = str(info.value)
    assert "\n" not in message and "set options.tls.cert_file and key_file" in message, message


def test_tls_client_certificate_from_another_ca_is_refused(toasty_factory, pki, other_pki):
    server = tls_server(toasty_factory, pki, client_ca=pki.ca)
    foreign = {"ca_file": str(pki.ca), "cert_file": str(other_pki.client_cert), "key_file": str(other_pki.client_key)}
    with pytest.raises(ToastyUnavailable, match=r"closed the TLS connection; it may not trust the client certificate"):
        run(Toasty({"target": server.target, "timeout": 3, "tls": foreign}), email_event())


@pytest.mark.parametrize(
    "target, host",
    [
        ("127.0.0.1:50051", "127.0.0.1"),
        ("localhost:1", "localhost"),
        ("[::1]:50051", "::1"),
        ("ipv6:[::1]:50051", "::1"),
        ("dns:///toasty.lan:50051", "toasty.lan"),
        ("dns://8.8.8.8/toasty.lan:50051", "toasty.lan"),
        ("ipv4:10.0.0.2:50051,10.0.0.3:50051", "10.0.0.2"),
        ("toasty.lan", "toasty.lan"),
        ("unix:/run/toasty.sock", None),
    ],
)
def test_target_host(target, host):
    assert target_host(target) == host


@pytest.mark.parametrize("target", ["10.0.0.2:50051", "toasty.lan:50051", "dns:///desk.example.com:443", "[fe80::1]:1"])
def test_plaintext_to_a_remote_target_is_refused_at_start(target):
    with pytest.raises(ConfigError, match=r"not a loopback address, so TLS is required") as info:
        Toasty({"target": target})
    assert "\n" not in str(info.value)
    with capture_logs() as logs:
        Toasty({"target": target, "insecure": True})  # said explicitly: allowed, and warned
    assert [e["log_level"] for e in logs if e["event"] == "toasty_insecure"] == ["warning"]
    Toasty({"target": target, "tls": {}})  # TLS with the system's CAs


@pytest.mark.parametrize("target", ["127.0.0.1:50051", "127.3.4.5:1", "localhost:50051", "[::1]:1", "unix:/tmp/t"])
def test_plaintext_to_loopback_stays_the_default(target):
    assert Toasty({"target": target})._credentials is None


def test_bad_tls_options_fail_at_start(tmp_path, pki):
    with pytest.raises(ConfigError, match=r"options.tls.ca_file: cannot read .*missing.pem"):
        Toasty({"target": "toasty.lan:1", "tls": {"ca_file": str(tmp_path / "missing.pem")}})
    not_pem = tmp_path / "not.pem"
    not_pem.write_text("hello")
    with pytest.raises(ConfigError, match=r"options.tls.ca_file: .*not.pem is not a PEM file"):
        Toasty({"target": "toasty.lan:1", "tls": {"ca_file": str(not_pem)}})
    with pytest.raises(ConfigError, match="cert_file and key_file go together"):
        Toasty({"target": "toasty.lan:1", "tls": {"cert_file": str(pki.client_cert)}})
    with pytest.raises(ConfigError, match="ca_fiel"):
        Toasty({"target": "toasty.lan:1", "tls": {"ca_fiel": str(pki.ca)}})


def test_embedded_tls_server_with_client_ca(pki):
    got: list[str] = []
    tls = ServerTls(str(pki.server_cert), str(pki.server_key), client_ca=str(pki.ca))
    server, port = serve("127.0.0.1:0", lambda note, nid: got.append(note.event_id), tls=tls)
    try:
        ev = email_event()
        options = {"ca_file": str(pki.ca), "cert_file": str(pki.client_cert), "key_file": str(pki.client_key)}
        run(Toasty({"target": f"localhost:{port}", "tls": options}), ev)
        assert got == [ev.id]
    finally:
        server.stop(None).wait(DEADLINE)


def test_console_server_tls_options_are_checked(tmp_path, capsys):
    with pytest.raises(SystemExit) as info:
        toasty_main(["--listen", "127.0.0.1:0", "--tls-cert", "c.pem"])
    assert info.value.code == 2 and "--tls-cert and --tls-key go together" in capsys.readouterr().err
    missing = str(tmp_path / "missing.pem")
    assert toasty_main(["--listen", "127.0.0.1:0", "--tls-cert", missing, "--tls-key", missing]) == 1
    err = capsys.readouterr().err
    assert err.startswith("toasty: ") and "missing.pem" in err and err.count("\n") == 1
