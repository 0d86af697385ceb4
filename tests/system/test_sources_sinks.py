"""config/examples/mail-toasty-parrot-webhook.yaml end to end, with real servers.

The example config is loaded as YAML and rewritten only for isolation: data_dir in a
private temp dir, ingest/confirm on ipc://, the imap producer pointed at a Dovecot
started here, the toasty worker at a console Toasty server started here
(`python -m nexus.tools.toasty --listen 127.0.0.1:0 --json`), the webhook worker at
an http.server started here. For measurements (printed as LATENCY-REPORT lines, not
asserted) a file producer on ./inbox and a `latency` group (tests/support/latency.py,
which records the wall clock at handler start) are added.

Then: IMAP APPEND -> the Toasty server prints the mapped notification with the event
id; parrot.notification sent with nexus.Producer -> the webhook server gets them as
JSON; the console worker prints both; SIGTERM stops everything with exit code 0.
"""

from __future__ import annotations

import contextlib
import http.server
import json
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.parse
import uuid
from dataclasses import dataclass, field
from email.message import EmailMessage
from email.utils import formatdate, make_msgid
from pathlib import Path

import latency
import msgspec
import pytest
import yaml

from nexus import Producer
from nexus import config as config_mod
from nexus.contracts import ParrotNotification
from nexus.testing import LaunchedPipeline, pid_alive, wait_for
from workers.mapping import Template

try:
    from tests import dovecot
except ImportError:  # plain `pytest` puts tests/ itself on sys.path
    import dovecot

pytestmark = [
    pytest.mark.system,
    pytest.mark.skipif(dovecot.BINARY is None, reason="dovecot is not installed (apt-get install dovecot-imapd)"),
]

REPO = Path(__file__).resolve().parents[2]
EXAMPLE = REPO / "config" / "examples" / "mail-toasty-parrot-webhook.yaml"
WAIT = 30.0  # generous deadline for every wait and every read
SAMPLES = 10  # latency samples per measurement
PASSWORD = "s3cret-imap-pw"


# -- the console Toasty server in a subprocess ----------------------------------------
class ToastyConsole:
    """`python -m nexus.tools.toasty --listen 127.0.0.1:0 --json`; lines kept with arrival times."""

    def __init__(self, stderr_path: Path):
        self._stderr = open(stderr_path, "wb")
        self.stderr_path = stderr_path
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "nexus.tools.toasty", "--listen", "127.0.0.1:0", "--json"],
            cwd=REPO,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=self._stderr,
            text=True,
        )
        self._lines: list[tuple[float, str]] = []  # (time.monotonic() on arrival, line)
        self._lock = threading.Lock()
        self._eof = threading.Event()
        self._reader = threading.Thread(target=self._read, name="toasty-stdout", daemon=True)
        self._reader.start()
        first = wait_for(
            lambda: self._snapshot()[:1] or self._check_alive(), WAIT, message="the Toasty server's 'listening' line"
        )[0][1]
        assert first.startswith("toasty listening on 127.0.0.1:"), first
        self.target = f"127.0.0.1:{int(first.rsplit(':', 1)[1])}"

    def _read(self) -> None:
        for line in self.proc.stdout:
            with self._lock:
                self._lines.append((time.monotonic(), line.rstrip("\n")))
        self._eof.set()

    def _snapshot(self) -> list[tuple[float, str]]:
        with self._lock:
            return list(self._lines)

    def _check_alive(self) -> bool:
        if self._eof.is_set() and self.proc.poll() is not None:
            raise AssertionError(
                f"toasty server exited with {self.proc.returncode}: "
                f"{self.stderr_path.read_text(errors='replace')[-2000:]}"
            )
        return False

    def notifications(self) -> list[tuple[float, dict]]:
        """(arrival time, notification) for every JSON line printed so far."""
        return [(t, json.loads(line)) for t, line in self._snapshot()[1:] if line.startswith("{")]

    def stop(self) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(WAIT)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(WAIT)
        self._reader.join(WAIT)
        self.proc.stdout.close()
        self._stderr.close()
        return self.proc.returncode


# -- the agent's webhook endpoint: a real HTTP server in a thread -----------------------
class WebhookReceiver(http.server.ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self):
        super().__init__(("127.0.0.1", 0), _WebhookHandler)
        self.requests: list[dict] = []
        self.lock = threading.Lock()
        self.thread = threading.Thread(
            target=self.serve_forever, kwargs={"poll_interval": 0.05}, name="webhook-receiver", daemon=True
        )
        self.thread.start()

    @property
    def port(self) -> int:
        return self.server_address[1]

    def received(self) -> list[dict]:
        with self.lock:
            return list(self.requests)

    def close(self) -> None:
        self.shutdown()
        self.server_close()
        self.thread.join(WAIT)


class _WebhookHandler(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive, as a real agent endpoint would
    timeout = WAIT  # no read on the request socket waits forever

    def do_POST(self):
        body = self.rfile.read(int(self.headers.get("Content-Length", "0")))
        with self.server.lock:
            self.server.requests.append(
                {
                    "t": time.monotonic(),
                    "method": "POST",
                    "path": self.path,
                    "headers": dict(self.headers),
                    "body": body,
                }
            )
        self.send_response(200)
        self.send_header("Content-Type", "text/plain")
        self.send_header("Content-Length", "2")
        self.end_headers()
        self.wfile.write(b"ok")

    def log_message(self, *args):
        pass


# -- the whole stack ---------------------------------------------------------------------
@dataclass
class Stack:
    root: Path
    example: dict  # the example config as written (before rewriting)
    config_path: Path
    cfg: config_mod.Config  # the rewritten config, loaded
    imap_name: str
    username: str
    out: Path  # latency records
    inbox: Path
    server: dovecot.Dovecot
    toasty: ToastyConsole
    webhook: WebhookReceiver
    pipeline: LaunchedPipeline
    stop_code: list = field(default_factory=list)

    def diagnostics(self) -> str:
        return (
            f"\n--- pipeline output (tail) ---\n{self.pipeline.output()[-4000:]}"
            f"\n--- toasty stderr ---\n{self.toasty.stderr_path.read_text(errors='replace')[-1000:]}"
        )

    def wait(self, condition, what: str, timeout: float = WAIT):
        try:
            return wait_for(condition, timeout, 0.01, what)
        except TimeoutError as exc:
            raise AssertionError(f"{exc}{self.diagnostics()}") from None

    def records(self) -> list[dict]:
        return latency.read(str(self.out))

    def record_where(self, pred) -> dict | None:
        return next((r for r in self.records() if pred(r)), None)

    def notification_for(self, event_id: str) -> tuple[float, dict] | None:
        return next(((t, n) for t, n in self.toasty.notifications() if n["event_id"] == event_id), None)


def rewrite(
    example: dict, *, server: dovecot.Dovecot, toasty_target: str, webhook_port: int, out: Path
) -> tuple[dict, str]:
    """The example config, made private to this test; returns (config, imap producer name)."""
    cfg = json.loads(json.dumps(example))  # deep copy
    cfg["data_dir"] = "./var"
    cfg["router"]["ingest"] = "ipc://{data_dir}/run/ingest"
    cfg["router"]["confirm"] = "ipc://{data_dir}/run/confirm"
    cfg["http"] = {"listen": ""}  # no fixed port (the HTTP port has its own tests)
    [imap_name] = [name for name, p in cfg["producers"].items() if p["kind"] == "imap"]
    cfg["producers"][imap_name].update(host=server.host, port=server.port)
    cfg["workers"]["toasty"]["options"]["target"] = toasty_target
    url = urllib.parse.urlsplit(cfg["workers"]["webhook"]["options"]["url"])
    cfg["workers"]["webhook"]["options"]["url"] = urllib.parse.urlunsplit(
        url._replace(netloc=f"127.0.0.1:{webhook_port}")
    )
    # measurement only: a file producer and a group that stamps handler start times
    cfg["producers"]["drops"] = {"kind": "file", "paths": ["./inbox"], "patterns": ["*.txt"], "debounce": "200ms"}
    cfg["workers"]["latency"] = {
        "handler": "latency:record",
        "subscribe": ["email.received", "file.created"],
        "processes": 1,
        "start": "earliest",
        "options": {"out": str(out)},
    }
    return cfg, imap_name


@pytest.fixture(scope="module")
def stack():
    with contextlib.ExitStack() as cleanup:
        # Not pytest's tmp_path: everything here is removed at teardown. Short, for ipc paths.
        root = Path(tempfile.mkdtemp(prefix="nexus-srcsink-"))
        cleanup.callback(shutil.rmtree, root, ignore_errors=True)
        example = yaml.safe_load(EXAMPLE.read_text())
        [imap_name] = [n for n, p in example["producers"].items() if p["kind"] == "imap"]
        username = example["producers"][imap_name]["username"]
        password_env = example["producers"][imap_name]["password_env"]

        server = dovecot.Dovecot(users={username: PASSWORD})
        cleanup.callback(server.close)
        server.start()
        webhook = WebhookReceiver()
        cleanup.callback(webhook.close)
        toasty = ToastyConsole(root / "toasty.stderr")
        cleanup.callback(toasty.stop)

        out, inbox = root / "latency", root / "inbox"
        out.mkdir()
        cfg, imap_name = rewrite(
            example, server=server, toasty_target=toasty.target, webhook_port=webhook.port, out=out
        )
        config_path = root / "nexus.yaml"
        config_path.write_text(yaml.safe_dump(cfg, sort_keys=False))

        pipeline = LaunchedPipeline(config_path, env={password_env: PASSWORD}, output_path=str(root / "launch.log"))
        cleanup.callback(pipeline.stop)
        s = Stack(
            root=root,
            example=example,
            config_path=config_path,
            cfg=config_mod.load(config_path),
            imap_name=imap_name,
            username=username,
            out=out,
            inbox=inbox,
            server=server,
            toasty=toasty,
            webhook=webhook,
            pipeline=pipeline,
        )
        try:
            pipeline.start(wait_ready=True, timeout=WAIT)  # every group has its members
        except (RuntimeError, TimeoutError) as exc:
            raise AssertionError(f"pipeline did not start: {exc}{s.diagnostics()}") from None
        # The imap producer starts at the newest message: mail appended before it is
        # connected would (correctly) never be emitted.
        s.wait(lambda: "imap_connected" in pipeline.output(), "imap_connected in the pipeline log")
        s.wait(lambda: "file_watch_started" in pipeline.output(), "file_watch_started")
        yield s


# -- helpers -------------------------------------------------------------------------------
def mail(subject: str, sender: str = "Ada Lovelace <ada@example.com>", body: str = "Are you free at noon?\n") -> bytes:
    msg = EmailMessage()
    msg["Subject"] = subject
    msg["From"] = sender
    msg["To"] = "you@example.com"
    msg["Date"] = formatdate(time.time())
    msg["Message-ID"] = make_msgid(domain="example.com")
    msg.set_content(body)
    return msg.as_bytes()


@contextlib.contextmanager
def imap_client(s: Stack):
    client = s.server.connect(s.username)  # logged in before any clock starts
    try:
        yield client
    finally:
        client.logout()


def append(client, message: bytes) -> None:
    typ, data = client.append("INBOX", None, None, message)
    assert typ == "OK", data


def rendered(s: Stack, record: dict) -> dict:
    """The notification the example's email.received mapping should produce for `record`."""
    entry = s.example["workers"]["toasty"]["options"]["mapping"]["email.received"]
    data = {
        "payload": record["payload"],
        "event": {"id": record["id"], "type": record["type"], "source": record["source"]},
    }
    return {k: Template(entry[k]).render(data) for k in ("title", "body", "tag") if k in entry}


def parrot_payload(i: int, kind: str) -> dict:
    if kind == "email":
        return {
            "app_id": "outlook",
            "app_name": "Outlook",
            "title": f"New mail {i}",
            "body": f"Quarterly report {i}",
            "notification_type": "email",
            "received_at": time.time(),
            "email_data": {
                "sender": "boss@example.com",
                "subject": f"Quarterly report {i}",
                "preview": "Numbers attached.",
            },
        }
    return {
        "app_id": "teams",
        "app_name": "Microsoft Teams",
        "title": f"Grace {i}",
        "body": f"standup in 5? ({i})",
        "notification_type": "message",
        "received_at": time.time(),
    }


def ms(values: list[float]) -> str:
    return f"n={len(values)} p50={statistics.median(values) * 1000:.0f}ms max={max(values) * 1000:.0f}ms"


# -- tests ---------------------------------------------------------------------------------
def test_new_mail_becomes_a_toasty_notification(stack):
    subject = f"Lunch on Friday? {uuid.uuid4().hex[:8]}"
    with imap_client(stack) as client:
        append(client, mail(subject))
    record = stack.wait(
        lambda: stack.record_where(lambda r: r["type"] == "email.received" and r["payload"]["subject"] == subject),
        "email.received handled by the latency group",
    )
    assert record["source"] == f"imap:{stack.imap_name}"
    _, note = stack.wait(
        lambda: stack.notification_for(record["id"]), f"a Toasty notification for event {record['id']}"
    )
    expected = rendered(stack, record)
    assert note["title"] == expected["title"] == "Mail from Ada Lovelace <ada@example.com>"
    assert note["body"] == expected["body"] == subject
    assert note["tag"] == expected.get("tag", "") == f"{stack.imap_name}/INBOX"
    assert note["event_id"] == record["id"]
    assert note["app"] == stack.example["workers"]["toasty"]["options"]["app"]
    assert note["urgency"] == "NORMAL"
    # the console worker (subscribe "*") shows it too
    # (its payload summary is cut at 160 characters, so match on the UID, not the subject)
    uid = record["payload"]["uid"]
    stack.wait(
        lambda: any(
            f"email.received from imap:{stack.imap_name}" in line and f'"uid":{uid},' in line
            for line in stack.pipeline.output().splitlines()
        ),
        "the console worker's email.received line",
    )
    # and nothing was posted to the agent's webhook for mail (it only takes Parrot)
    assert not [r for r in stack.webhook.received() if json.loads(r["body"])["type"] == "email.received"]


def test_parrot_notifications_reach_the_agent_webhook(stack):
    options = stack.example["workers"]["webhook"]["options"]
    url = urllib.parse.urlsplit(options["url"])
    sent: dict[str, tuple[dict, str, int]] = {}  # id -> (payload, key, priority)
    with Producer(stack.cfg.confirm, source="parrot") as producer:
        for i, kind in enumerate(["email", "message", "email", "message"]):
            payload = parrot_payload(i, kind)
            priority = 2 if kind == "email" else 5
            event_id = producer.send("parrot.notification", payload, key=payload["app_id"], priority=priority)
            sent[event_id] = (payload, payload["app_id"], priority)
        producer.flush(WAIT)  # journaled: ACKed by the router

    def posted():
        got = {r["headers"].get("X-Nexus-Event-Id"): r for r in stack.webhook.received()}
        return got if set(sent) <= set(got) else None

    got = stack.wait(posted, f"{len(sent)} webhook POSTs")
    for event_id, (payload, key, priority) in sent.items():
        req = got[event_id]
        assert req["path"] == url.path
        assert req["headers"]["Content-Type"] == "application/json"
        for name, value in options.get("headers", {}).items():
            assert req["headers"][name] == value
        body = json.loads(req["body"])
        assert set(body) == {"id", "type", "source", "time", "key", "priority", "correlation_id", "v", "payload"}
        assert (body["id"], body["type"], body["source"]) == (event_id, "parrot.notification", "parrot")
        assert (body["key"], body["priority"], body["v"], body["correlation_id"]) == (key, priority, 1, None)
        assert abs(body["time"] - time.time()) < 300
        for name, value in payload.items():
            assert body["payload"][name] == value, name
        msgspec.convert(body["payload"], ParrotNotification)  # still honours the contract
    # Parrot goes to the agent, not to the desktop; the console shows it
    assert not [n for _, n in stack.toasty.notifications() if n["event_id"] in sent]
    stack.wait(
        lambda: stack.pipeline.output().count("parrot.notification from parrot") >= len(sent),
        "console lines for the Parrot events",
    )


def test_latency_imap_append_to_toasty(stack):
    """Measured, not asserted: IMAP APPEND -> handler start, and -> notification printed."""
    to_handler: list[float] = []
    to_printed: list[float] = []
    with imap_client(stack) as client:
        for i in range(SAMPLES):
            subject = f"latency probe {i} {uuid.uuid4().hex[:8]}"
            message = mail(subject)
            t0_wall, t0 = time.time(), time.monotonic()
            append(client, message)
            record = stack.wait(
                lambda: stack.record_where(
                    lambda r: r["type"] == "email.received" and r["payload"]["subject"] == subject
                ),
                f"latency record for mail {i}",
            )
            printed_at, note = stack.wait(lambda: stack.notification_for(record["id"]), f"notification for mail {i}")
            assert note["body"] == subject
            to_handler.append(record["t"] - t0_wall)
            to_printed.append(printed_at - t0)
    print(f"\nLATENCY-REPORT imap-append->handler-start {ms(to_handler)}")
    print(f"LATENCY-REPORT imap-append->toasty-printed {ms(to_printed)}")


def test_latency_file_drop_to_handler(stack):
    """Measured, not asserted: file written in the watched dir -> handler start."""
    debounce = stack.cfg.producers["drops"].debounce
    samples: list[float] = []
    for i in range(SAMPLES):
        name = f"drop-{i}-{uuid.uuid4().hex[:8]}.txt"
        t0_wall = time.time()
        (stack.inbox / name).write_text(f"sample {i}\n")
        record = stack.wait(
            lambda: stack.record_where(
                lambda r: r["type"] == "file.created" and Path(r["payload"]["path"]).name == name
            ),
            f"file.created for {name}",
        )
        assert record["source"] == "file:drops"
        samples.append(record["t"] - t0_wall)
    print(
        f"\nLATENCY-REPORT file-drop->handler-start {ms(samples)} "
        f"(includes the file producer's debounce of {debounce * 1000:.0f}ms)"
    )


def test_sigterm_stops_everything_cleanly(stack):
    """Last: the launcher drains on SIGTERM, exits 0, and leaves no child behind."""
    children = stack.pipeline.child_pids()
    assert len(children) == 1 + len(stack.cfg.producers) + len(stack.cfg.workers)
    code = stack.pipeline.stop(timeout=WAIT * 2)
    assert code == 0, stack.diagnostics()
    stack.wait(lambda: not any(pid_alive(pid) for pid in children), "every child process gone")
    assert "event_dead_lettered" not in stack.pipeline.output(), stack.diagnostics()
