"""workers.toasty against a real Toasty server (`python -m nexus.tools.toasty`) in another process."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import grpc
import pytest
import structlog
from toasty_server import ToastyProcess

from nexus.contracts import EmailReceived, ParrotEmailData, ParrotNotification
from nexus.errors import ConfigError
from nexus.member.context import Context
from nexus.proto.toasty.v1 import toasty_pb2 as pb
from nexus.proto.toasty.v1 import toasty_pb2_grpc as pb_grpc
from nexus.protocol.events import Event, new_id
from nexus.testing import free_port, wait_for
from nexus.tools.toasty import serve
from workers.mapping import TemplateError
from workers.toasty import Toasty, ToastyError

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
