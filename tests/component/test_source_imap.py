"""The IMAP producer against a real Dovecot (tests/dovecot.py): IDLE, restarts, failures."""

from __future__ import annotations

import json
import statistics
import threading
import time
from email.message import EmailMessage
from email.utils import formatdate, make_msgid

import msgspec
import pytest
import structlog

from nexus.common import statefile
from nexus.config import Config, Duration
from nexus.contracts import EmailReceived
from nexus.errors import ConfigError
from nexus.sources import imap
from nexus.sources.imap import ImapConfig, ImapSource
from nexus.testing import CollectingSink, wait_for

try:
    from tests import dovecot
except ImportError:  # plain `pytest` puts tests/ itself on sys.path
    import dovecot

pytestmark = pytest.mark.skipif(
    dovecot.BINARY is None, reason="dovecot is not installed (apt-get install dovecot-imapd)"
)

WAIT = 15.0


# -- fixtures -------------------------------------------------------------------
@pytest.fixture
def server():
    srv = dovecot.Dovecot(users={"alice": "secret"})
    try:
        srv.start()
        yield srv
    finally:
        srv.close()


class Running:
    """`ImapSource.run` in a thread, as the producer process runs it."""

    def __init__(self, name: str, spec: ImapConfig, data_dir: str, sink: CollectingSink):
        self.name, self.spec, self.sink = name, spec, sink
        self.stop_event = threading.Event()
        self.error: BaseException | None = None
        self.source = ImapSource(name, spec, Config(data_dir=data_dir))
        self.thread = threading.Thread(target=self._run, name=f"imap-test-{name}", daemon=True)
        self.thread.start()

    def _run(self) -> None:
        try:
            self.source.run(self.sink, self.stop_event)
        except BaseException as exc:  # surfaced by stop()
            self.error = exc

    def status(self, mailbox: str = "INBOX") -> imap.MailboxStatus | None:
        return imap.STATUS.get((self.name, mailbox))

    def wait_idle(self, mailbox: str = "INBOX", connects: int = 1) -> None:
        def idle():
            st = self.status(mailbox)
            return st is not None and st.state == "idle" and st.connects >= connects

        wait_for(idle, WAIT, message=f"{self.name}/{mailbox} to IDLE")

    def wait_events(self, n: int) -> list[dict]:
        wait_for(lambda: len(self.sink.events) >= n, WAIT, message=f"{n} events")
        return self.sink.of_type("email.received")

    def stop(self) -> None:
        self.stop_event.set()
        self.thread.join(10)
        assert not self.thread.is_alive(), "ImapSource.run did not return after stop was set"
        assert self.error is None, f"ImapSource.run raised {self.error!r}"


@pytest.fixture
def producer(tmp_path):
    started: list[Running] = []

    def start(server, *, name: str = "work", sink: CollectingSink | None = None, data_dir=None, **fields) -> Running:
        fields = {
            "mailboxes": ["INBOX"],
            "password": "secret",
            "reconnect_max": Duration(2),
            "port": server.port,
            "tls": "none",
            **fields,
        }
        spec = ImapConfig(host=server.host, username="alice", **fields)
        r = Running(name, spec, str(data_dir or tmp_path / "data"), sink or CollectingSink())
        started.append(r)
        return r

    yield start
    for r in started:
        if r.thread.is_alive():
            r.stop()


def mail(
    subject: str,
    body: str = "Hello Bob,\n\nsee you at noon.\n",
    *,
    sender: str = "Alice Example <alice@example.com>",
    to=("Bob <bob@example.com>",),
    cc=(),
    html: str | None = None,
    attachment: bytes | None = None,
) -> bytes:
    msg = EmailMessage()
    msg["Subject"] = subject
    msg["From"] = sender
    msg["To"] = ", ".join(to)
    if cc:
        msg["Cc"] = ", ".join(cc)
    msg["Date"] = formatdate(1700000000)
    msg["Message-ID"] = make_msgid(domain="example.com")
    msg.set_content(body)
    if html is not None:
        msg.add_alternative(html, subtype="html")
    if attachment is not None:
        msg.add_attachment(attachment, maintype="application", subtype="pdf", filename="report.pdf")
    return msg.as_bytes()


def subjects(events: list[dict]) -> list[str]:
    return [e["subject"] for e in events]


# -- tests ----------------------------------------------------------------------
def test_new_mail_while_idle_is_emitted(server, producer):
    p = producer(server)
    p.wait_idle()
    uid = server.append(mail("Lunch?", cc=("carol@example.com",)))
    [event] = p.wait_events(1)
    typ, payload, key = p.sink.events[0]
    assert (typ, key) == ("email.received", "work:INBOX")
    assert payload["uid"] == uid and payload["uidvalidity"] > 0
    assert payload["account"] == "work" and payload["mailbox"] == "INBOX"
    assert payload["subject"] == "Lunch?"
    assert payload["from"] == "Alice Example <alice@example.com>"
    assert payload["to"] == ["Bob <bob@example.com>"] and payload["cc"] == ["carol@example.com"]
    assert payload["snippet"] == "Hello Bob, see you at noon."
    assert payload["date"] == 1700000000.0 and payload["size"] > 0
    assert payload["message_id"].endswith("@example.com>")
    assert payload["has_attachments"] is False and "\\Seen" not in payload["flags"]
    msgspec.convert(payload, EmailReceived)  # honours the contract
    assert p.sink.flushes >= 1
    # what `nexus status` shows for the producer (written by the runner every second)
    wait_for(lambda: p.source.status()["mailboxes"]["INBOX"]["emitted"] == 1, WAIT, message="status counts it")
    assert p.source.status()["mailboxes"]["INBOX"]["last_uid"] == uid
    # BODY.PEEK[]: the message is still unread for the user
    client = server.connect()
    client.select("INBOX")
    typ, data = client.uid("FETCH", str(uid), "(FLAGS)")
    client.logout()
    assert b"\\Seen" not in data[0]
    p.stop()
    assert p.status().state == "stopped"


def test_mail_from_before_the_first_start_is_not_emitted(server, producer):
    server.append(mail("old 1"))
    server.append(mail("old 2"))
    p = producer(server)
    p.wait_idle()
    server.append(mail("new"))
    assert subjects(p.wait_events(1)) == ["new"]
    server.append(mail("newer"))  # still nothing old in between
    assert subjects(p.wait_events(2)) == ["new", "newer"]


def test_restart_emits_exactly_the_mail_missed_while_down(server, producer, tmp_path):
    first = producer(server)
    first.wait_idle()
    server.append(mail("before stop"))
    first.wait_events(1)
    first.stop()
    # issue 10 #16: the state file has a checksummed header (nexus/common/statefile.py)
    state = json.loads(statefile.decode((tmp_path / "data" / "imap" / "work.json").read_bytes()))
    assert state["mailboxes"]["INBOX"]["last_uid"] == first.sink.of_type("email.received")[0]["uid"]

    missed = [server.append(mail(f"missed {i}")) for i in range(3)]
    second = producer(server)
    events = second.wait_events(3)
    assert [e["uid"] for e in events] == missed
    second.wait_idle()
    server.append(mail("after restart"))
    events = second.wait_events(4)
    assert subjects(events) == ["missed 0", "missed 1", "missed 2", "after restart"]
    assert len({e["uid"] for e in events}) == 4


def test_uidvalidity_change_starts_from_the_newest_mail(server, producer):
    server.create_mailbox("Work")
    first = producer(server, mailboxes=["Work"])
    first.wait_idle("Work")
    server.append(mail("old numbering"), mailbox="Work")
    first.wait_events(1)
    first.stop()
    server.delete_mailbox("Work")  # recreated: new UIDVALIDITY
    server.create_mailbox("Work")
    server.append(mail("renumbered, not replayed"), mailbox="Work")
    with structlog.testing.capture_logs() as logs:
        second = producer(server, mailboxes=["Work"])
        second.wait_idle("Work")
    [changed] = [e for e in logs if e["event"] == "imap_uidvalidity_changed"]
    assert changed["stored"] != changed["server"]
    server.append(mail("new numbering"), mailbox="Work")
    assert subjects(second.wait_events(1)) == ["new numbering"]


def test_two_mailboxes(server, producer):
    server.create_mailbox("Work Stuff")
    p = producer(server, mailboxes=["INBOX", "Work Stuff"])
    p.wait_idle("INBOX")
    p.wait_idle("Work Stuff")
    server.append(mail("to work"), mailbox="Work Stuff")
    server.append(mail("to inbox"))
    p.wait_events(2)
    got = {payload["subject"]: (payload["mailbox"], key) for _, payload, key in p.sink.events}
    assert got == {"to work": ("Work Stuff", "work:Work Stuff"), "to inbox": ("INBOX", "work:INBOX")}


def test_wrong_password_is_logged_and_does_not_crash(server, producer):
    with structlog.testing.capture_logs() as logs:
        p = producer(server, password="wrong-password", reconnect_max=Duration(60))
        wait_for(lambda: p.status() is not None and p.status().state == "auth_failed", WAIT, message="auth failure")
        failures = [e for e in logs if e["event"] == "imap_auth_failed"]
        assert failures and failures[0]["log_level"] == "error"
        assert failures[0]["host"] == "127.0.0.1" and failures[0]["user"] == "alice"
        assert "alice" in failures[0]["error"] and "127.0.0.1" in failures[0]["error"]
        assert p.thread.is_alive()
        p.stop()  # interrupts the slow retry wait
    assert "wrong-password" not in repr(logs)
    assert p.status().auth_failures == 1  # retried slowly, not in a tight loop


def test_missing_password_is_a_config_error(tmp_path, monkeypatch):
    monkeypatch.delenv("NEXUS_TEST_IMAP_PW", raising=False)
    spec = ImapConfig(host="127.0.0.1", username="alice", password_env="NEXUS_TEST_IMAP_PW")
    with pytest.raises(ConfigError, match=r"producers\.work\.password_env"):
        ImapSource("work", spec, Config(data_dir=str(tmp_path))).run(CollectingSink(), threading.Event())
    monkeypatch.setenv("NEXUS_TEST_IMAP_PW", "secret")  # and the variable is used
    assert imap._password("work", spec) == "secret"


def test_reconnects_after_server_restart(server, producer):
    with structlog.testing.capture_logs() as logs:
        p = producer(server)
        p.wait_idle()
        server.stop()
        wait_for(lambda: p.status().state == "backoff", WAIT, message="disconnect noticed")
        server.start()
        p.wait_idle(connects=2)
        server.append(mail("after server restart"))
        assert subjects(p.wait_events(1)) == ["after server restart"]
    assert any(e["event"] == "imap_disconnected" and e["log_level"] == "warning" for e in logs)


def test_multipart_with_attachment(server, producer):
    p = producer(server)
    p.wait_idle()
    server.append(
        mail("Report", "Numbers attached.", html="<p>Numbers <b>attached</b></p>", attachment=b"%PDF-1.4 fake")
    )
    server.append(mail("=?utf-8?q?Gr=C3=BC=C3=9Fe?= aus Berlin", "x"))
    events = p.wait_events(2)
    assert events[0]["has_attachments"] is True
    assert events[0]["snippet"] == "Numbers attached."  # the text part, not the HTML
    assert events[1]["subject"] == "Grüße aus Berlin"  # RFC 2047 decoded


def test_html_only_snippet_and_bounds():
    msg = EmailMessage()
    msg["Subject"] = "s" * 5000
    msg["From"] = "a@example.com"
    msg.set_content(
        "<html><head><title>T</title><style>p {}</style></head><body><p>Hi&nbsp;"
        "<b>there</b></p><p>second</p></body></html>",
        subtype="html",
    )
    payload = imap.build_payload(
        msg.as_bytes(),
        account="work",
        mailbox="INBOX",
        uid=7,
        uidvalidity=1,
        flags=["\\Recent", "\\Flagged"],
        size=None,
        snippet_chars=12,
    )
    assert payload["snippet"] == "Hi there sec"
    assert len(payload["subject"]) == 2048 and payload["flags"] == ["\\Flagged"]
    msgspec.convert(payload, EmailReceived)


def test_raw_8bit_headers_become_valid_text():
    raw = (
        "Subject: Grüße\r\nFrom: Jörg <j@example.com>\r\nTo: x\udcff@example.com\r\n"
        "Content-Type: text/plain; charset=utf-8\r\n\r\nHällo\r\n"
    ).encode("utf-8", "surrogateescape")
    payload = imap.build_payload(
        raw, account="work", mailbox="INBOX", uid=1, uidvalidity=1, flags=[], size=None, snippet_chars=100
    )
    assert payload["subject"] == "Grüße" and payload["from"] == "Jörg <j@example.com>"
    assert payload["to"] == ["x\ufffd@example.com"] and payload["snippet"] == "Hällo"
    msgspec.msgpack.encode(payload)  # no lone surrogates left


def test_append_to_emit_latency(server, producer):
    """Measured, not asserted: time from IMAP APPEND to sink.emit, over 20 messages."""
    emitted: list[float] = []

    class TimedSink(CollectingSink):
        def emit(self, *args, **kwargs):
            emitted.append(time.monotonic())
            return super().emit(*args, **kwargs)

    p = producer(server, sink=TimedSink())
    p.wait_idle()
    client = server.connect()  # logged in before the clock starts
    latencies = []
    try:
        for i in range(20):
            p.wait_idle()  # one message per IDLE wake-up
            message = mail(f"latency {i}")
            t0 = time.monotonic()
            typ, data = client.append("INBOX", None, None, message)
            assert typ == "OK", data
            p.wait_events(i + 1)
            latencies.append(emitted[i] - t0)
    finally:
        client.logout()
    print(
        f"\nIMAP APPEND -> sink.emit over {len(latencies)} messages: "
        f"p50 {statistics.median(latencies) * 1000:.0f} ms, max {max(latencies) * 1000:.0f} ms"
    )


# -- TLS and non-ASCII mailbox names (issue 12, point 6) --------------------------------
@pytest.fixture
def tls_server():
    srv = dovecot.Dovecot(users={"alice": "secret"}, tls=True)
    try:
        srv.start()
        yield srv
    finally:
        srv.close()


@pytest.fixture(scope="module")
def other_ca(tmp_path_factory):
    try:
        from tests.tlscerts import TestPKI
    except ImportError:
        from tlscerts import TestPKI
    return TestPKI(tmp_path_factory.mktemp("other-ca"), name="Some Other CA").ca


def logins(server) -> list[str]:
    return [line for line in server.log_tail(1000).splitlines() if "Login: user=<alice>" in line]


@pytest.mark.parametrize("mode", ["ssl", "starttls"])
def test_tls_delivers_mail(tls_server, producer, mode):
    port = tls_server.ssl_port if mode == "ssl" else tls_server.port
    with structlog.testing.capture_logs() as logs:
        p = producer(tls_server, tls=mode, port=port, ca_file=str(tls_server.pki.ca))
        p.wait_idle()
        # Dovecot's own word that the producer's login ran inside TLS (the only login so far)
        [login] = logins(tls_server)
        assert ", TLS, " in login, login
        uid = tls_server.append(mail(f"over {mode}"))
        [event] = p.wait_events(1)
    assert (event["subject"], event["uid"]) == (f"over {mode}", uid)
    [connected] = [e for e in logs if e["event"] == "imap_connected"]
    assert (connected["tls"], connected["port"]) == (mode, port)
    assert "secret" not in repr(logs)


@pytest.mark.parametrize("mode", ["ssl", "starttls"])
def test_a_certificate_from_another_ca_is_refused_before_login(tls_server, producer, other_ca, mode):
    port = tls_server.ssl_port if mode == "ssl" else tls_server.port
    with structlog.testing.capture_logs() as logs:
        p = producer(tls_server, tls=mode, port=port, ca_file=str(other_ca), reconnect_max=Duration(60))
        wait_for(lambda: p.status() is not None and p.status().state == "tls_failed", WAIT, message="TLS refusal")
        p.stop()
    [failed] = [e for e in logs if e["event"] == "imap_tls_failed"]  # once: retried slowly
    error = failed["error"]
    assert failed["log_level"] == "error" and "\n" not in error
    assert f"TLS with 127.0.0.1:{port} ({mode}) refused: certificate not trusted" in error, error
    assert f"checked against ca_file {other_ca}" in error
    assert logins(tls_server) == []  # the password never left
    assert "secret" not in repr(logs)


def test_starttls_not_offered_is_refused_never_plaintext(server, producer):
    # `server` has TLS off, so it does not offer STARTTLS
    with structlog.testing.capture_logs() as logs:
        p = producer(server, tls="starttls", reconnect_max=Duration(60))
        wait_for(lambda: p.status() is not None and p.status().state == "tls_failed", WAIT, message="TLS refusal")
        p.stop()
    [failed] = [e for e in logs if e["event"] == "imap_tls_failed"]
    assert "does not offer STARTTLS" in failed["error"]
    assert logins(server) == []


def test_tls_config_rules(tmp_path):
    cfg = Config(data_dir=str(tmp_path))

    def check(**fields):
        ImapSource.check("work", msgspec.convert({"username": "me", **fields}, ImapConfig), cfg)

    with pytest.raises(ConfigError, match=r"producers\.work\.tls: without TLS .* in clear to imap\.example\.com") as e:
        check(host="imap.example.com", tls="none")
    assert "\n" not in str(e.value)
    with pytest.raises(ConfigError, match=r"producers\.work\.ssl: without TLS"):  # the older spelling
        check(host="10.1.2.3", ssl=False)
    check(host="imap.example.com", tls="none", insecure=True)  # said explicitly
    check(host="127.0.0.1", tls="none")
    check(host="localhost", ssl=False)
    check(host="imap.example.com", tls="starttls", ca_file="ca.pem")
    with pytest.raises(ConfigError, match=r"producers\.work\.ca_file: only used with tls"):
        check(host="127.0.0.1", tls="none", ca_file="ca.pem")
    with pytest.raises(msgspec.ValidationError, match="set tls only"):
        msgspec.convert({"host": "h", "username": "me", "ssl": True, "tls": "ssl"}, ImapConfig)
    spec = msgspec.convert
    assert spec({"host": "h", "username": "u"}, ImapConfig).server_port == 993
    assert spec({"host": "h", "username": "u", "tls": "starttls"}, ImapConfig).server_port == 143
    assert spec({"host": "h", "username": "u", "ssl": False}, ImapConfig).tls_mode == "none"
    assert spec({"host": "h", "username": "u", "tls": "ssl", "port": 1993}, ImapConfig).server_port == 1993


def test_a_missing_ca_file_is_a_config_error(tmp_path):
    spec = ImapConfig(host="127.0.0.1", username="alice", password="x", ca_file="nope/ca.pem")
    with pytest.raises(ConfigError, match=r"producers\.work\.ca_file: cannot load .*nope/ca\.pem"):
        ImapSource("work", spec, Config(data_dir=str(tmp_path))).run(CollectingSink(), threading.Event())


def test_mailbox_names_are_modified_utf7_on_the_wire():
    # RFC 3501 5.1.3's own example, and the names below
    assert imap.wire_name("~peter/mail/台北/日本語") == '"~peter/mail/&U,BTFw-/&ZeVnLIqe-"'
    assert imap.wire_name("Eingang/Größe") == '"Eingang/Gr&APYA3w-e"'
    assert imap.wire_name("Tom & Jerry") == '"Tom &- Jerry"'
    assert imap.wire_name("INBOX") == '"INBOX"'


def test_non_ascii_mailboxes_against_dovecot(tls_server, producer):
    # made by their wire names, so the test does not trust the encoder it checks
    wire = {"Eingang/Größe": "Eingang/Gr&APYA3w-e", "日本語": "&ZeVnLIqe-", "Tom & Jerry": "Tom &- Jerry"}
    for name in wire.values():
        tls_server.create_mailbox(name)
    p = producer(tls_server, mailboxes=list(wire), tls="starttls", ca_file=str(tls_server.pki.ca))
    for name in wire:
        p.wait_idle(name)
    for name, raw in wire.items():
        tls_server.append(mail(f"to {name}"), mailbox=raw)
    p.wait_events(3)
    got = {payload["subject"]: (payload["mailbox"], key) for _, payload, key in p.sink.events}
    assert got == {f"to {name}": (name, f"work:{name}") for name in wire}
    assert set(wire) <= set(p.source.status()["mailboxes"])  # named as configured
