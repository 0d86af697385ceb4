"""workers.webhook against a real HTTP server (stdlib http.server in a thread)."""

from __future__ import annotations

import asyncio
import json
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import msgspec
import pytest
import structlog
from structlog.testing import capture_logs

from nexus.contracts import EmailReceived
from nexus.errors import ConfigError
from nexus.member.context import Context
from nexus.protocol.events import Event, new_id
from nexus.testing import free_port
from workers.webhook import Webhook, WebhookError

DEADLINE = 10.0


class Recorder(ThreadingHTTPServer):
    """Records every request; answers with the scripted statuses, then 200."""

    def __init__(self):
        super().__init__(("127.0.0.1", 0), _Handler)
        self.requests: list[dict] = []
        self.statuses: list[int] = []
        self.hang_up = 0  # close this many connections after replying, without saying so
        self.required: dict[str, str] = {}  # headers a request must carry, else 401
        self.lock = threading.Lock()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}"


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive, as real servers do

    def do_POST(self):
        body = self.rfile.read(int(self.headers["Content-Length"]))
        server: Recorder = self.server
        with server.lock:
            server.requests.append(
                {"path": self.path, "headers": dict(self.headers), "body": body, "client": self.client_address}
            )
            status = server.statuses.pop(0) if server.statuses else 200
            if any(self.headers.get(k) != v for k, v in server.required.items()):
                status = 401
            if server.hang_up:
                server.hang_up -= 1
                self.close_connection = True
        reply = f"status {status}".encode()
        self.send_response(status)
        self.send_header("Content-Length", str(len(reply)))
        self.end_headers()
        self.wfile.write(reply)

    def log_message(self, *args):  # keep test output clean
        pass


@pytest.fixture
def http_server():
    server = Recorder()
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    yield server
    server.shutdown()
    server.server_close()
    thread.join(DEADLINE)


def email_event(**kw) -> Event:
    payload = EmailReceived(
        account="work", mailbox="INBOX", uid=7, uidvalidity=1, from_="ada@example.com", subject="Lunch?"
    )
    return Event(type="email.received", source="imap:work", payload=payload, id=new_id(), time=time.time(), **kw)


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


def run(handler: Webhook, *events: Event) -> None:
    async def main():
        for ev in events:
            await asyncio.wait_for(handler.handle(ev, ctx_for(ev)), DEADLINE)

    try:
        asyncio.run(main())
    finally:
        handler.close()


def retries_logged(logs: list[dict]) -> int:
    return sum(1 for entry in logs if entry["event"] == "webhook_retry")


def test_post_body_and_headers(http_server):
    ev = email_event(key="k1", priority=2, correlation_id="corr-1")
    run(Webhook({"url": http_server.url + "/hooks/nexus?x=1", "headers": {"Authorization": "Bearer t"}}), ev)
    [req] = http_server.requests
    assert req["path"] == "/hooks/nexus?x=1"
    assert json.loads(req["body"]) == {
        "id": ev.id,
        "type": "email.received",
        "source": "imap:work",
        "time": ev.time,
        "key": "k1",
        "priority": 2,
        "correlation_id": "corr-1",
        "v": 1,
        "payload": msgspec.to_builtins(ev.payload),
    }
    assert json.loads(req["body"])["payload"]["from"] == "ada@example.com"
    headers = req["headers"]
    assert headers["Content-Type"] == "application/json"
    assert headers["X-Nexus-Event-Id"] == ev.id
    assert headers["Authorization"] == "Bearer t"
    assert headers["Content-Length"] == str(len(req["body"]))


def test_defaults_in_body_and_keep_alive(http_server):
    first, second = email_event(), email_event()
    run(Webhook({"url": http_server.url}), first, second)
    a, b = http_server.requests
    body = json.loads(a["body"])
    assert (body["key"], body["priority"], body["correlation_id"], body["v"]) == (None, 5, None, 1)
    assert (a["path"], json.loads(b["body"])["id"]) == ("/", second.id)
    assert a["client"] == b["client"]  # the second POST reused the connection


def test_server_closing_an_idle_connection_is_not_a_failure(http_server):
    http_server.hang_up = 1
    first, second = email_event(), email_event()
    with capture_logs() as logs:
        run(Webhook({"url": http_server.url}), first, second)
    assert [r["headers"]["X-Nexus-Event-Id"] for r in http_server.requests] == [first.id, second.id]
    assert retries_logged(logs) == 0


def test_5xx_is_retried_inside_the_handler(http_server):
    http_server.statuses[:] = [500, 503]
    ev = email_event()
    with capture_logs() as logs:
        run(Webhook({"url": http_server.url}), ev)
    assert len(http_server.requests) == 3
    assert {r["headers"]["X-Nexus-Event-Id"] for r in http_server.requests} == {ev.id}
    assert retries_logged(logs) == 2


def test_5xx_gives_up_after_retries(http_server):
    http_server.statuses[:] = [502] * 3
    with pytest.raises(WebhookError, match=r"HTTP 502 .*status 502.*gave up after 3 attempts") as info:
        run(Webhook({"url": http_server.url, "retries": 2}), email_event())
    assert info.value.status == 502
    assert len(http_server.requests) == 3


def test_4xx_raises_without_inner_retry(http_server):
    http_server.statuses[:] = [404]
    with capture_logs() as logs, pytest.raises(WebhookError, match=r"HTTP 404 Not Found: status 404") as info:
        run(Webhook({"url": http_server.url}), email_event())
    assert (info.value.status, info.value.retryable) == (404, False)
    assert len(http_server.requests) == 1
    assert retries_logged(logs) == 0


def test_connection_refused_raises_after_retries():
    url = f"http://127.0.0.1:{free_port()}/hook"  # nothing listens there
    with (
        capture_logs() as logs,
        pytest.raises(WebhookError, match=r"ConnectionRefusedError.*gave up after 4 attempts") as info,
    ):
        run(Webhook({"url": url, "retries": 3}), email_event())
    assert info.value.status is None
    assert retries_logged(logs) == 3


@pytest.mark.parametrize(
    "options, message",
    [
        ({}, r"options\.url is required"),
        ({"url": ""}, r"options\.url is required"),
        ({"url": "ftp://example.com/x"}, "must be an http:// or https:// URL"),
        ({"url": "https://user:secret@example.com/x"}, "must not carry credentials"),
        ({"url": "http://example.com", "retries": -1}, "retries"),
        ({"url": "http://example.com", "timout": 3}, "timout"),
    ],
)
def test_bad_options_fail_at_start(options, message):
    with pytest.raises(ConfigError, match=message):
        Webhook(options)


# -- header values from the environment (issue 12, point 6) ------------------------------
TOKEN = "tok-5f1c2e9a-never-logged"


def test_header_value_from_the_environment(http_server, monkeypatch):
    monkeypatch.setenv("NEXUS_TEST_WEBHOOK_TOKEN", TOKEN)
    http_server.required = {"Authorization": f"Bearer {TOKEN}", "X-Api-Key": TOKEN, "X-Plain": "v"}
    headers = {
        "Authorization": {"env": "NEXUS_TEST_WEBHOOK_TOKEN", "prefix": "Bearer "},
        "X-Api-Key": {"env": "NEXUS_TEST_WEBHOOK_TOKEN"},
        "X-Plain": "v",
    }
    ev = email_event()
    with capture_logs() as logs:
        run(Webhook({"url": http_server.url, "headers": headers}), ev)
    [req] = http_server.requests  # the server checked the headers: 200, not 401
    assert req["headers"]["Authorization"] == f"Bearer {TOKEN}"
    assert req["headers"]["X-Nexus-Event-Id"] == ev.id
    assert TOKEN not in repr(logs)


def test_a_wrong_token_is_refused_by_the_server(http_server, monkeypatch):
    monkeypatch.setenv("NEXUS_TEST_WEBHOOK_TOKEN", "not-the-token")
    http_server.required = {"Authorization": f"Bearer {TOKEN}"}
    headers = {"Authorization": {"env": "NEXUS_TEST_WEBHOOK_TOKEN", "prefix": "Bearer "}}
    with pytest.raises(WebhookError, match="HTTP 401") as info:
        run(Webhook({"url": http_server.url, "headers": headers}), email_event())
    assert "not-the-token" not in str(info.value)


@pytest.mark.parametrize("value", [None, "", f"{TOKEN}\r\nX-Evil: 1"])
def test_a_missing_or_bad_variable_is_one_config_line_without_the_value(monkeypatch, value):
    if value is None:
        monkeypatch.delenv("NEXUS_TEST_WEBHOOK_TOKEN", raising=False)
    else:
        monkeypatch.setenv("NEXUS_TEST_WEBHOOK_TOKEN", value)
    headers = {"Authorization": {"env": "NEXUS_TEST_WEBHOOK_TOKEN", "prefix": "Bearer "}}
    with pytest.raises(ConfigError) as info:
        Webhook({"url": "https://example.com/hook", "headers": headers})
    message = str(info.value)
    assert message.startswith("webhook options.headers.Authorization: ")
    assert "environment variable NEXUS_TEST_WEBHOOK_TOKEN" in message
    assert "\n" not in message and TOKEN not in message
    if value:
        assert "line break" in message
    else:
        assert "is not set or empty" in message


@pytest.mark.parametrize(
    "header, message",
    [
        ({"env": ""}, "headers"),
        ({"evn": "X"}, "evn"),
        ({"prefix": "Bearer "}, "env"),
        (7, "headers"),
    ],
)
def test_bad_header_specs_fail_at_start(header, message):
    with pytest.raises(ConfigError, match=message):
        Webhook({"url": "https://example.com/hook", "headers": {"Authorization": header}})
