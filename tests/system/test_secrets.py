"""Secrets never shown (issue 12, point 7), with real servers and real errors.

A launched pipeline with an IMAP source on a Dovecot started here (its password from
the environment, `password_env`), a webhook group whose target refuses every POST with
401 and echoes the token of the request's Authorization header in its body (as a careless server
might), and a second webhook group whose URL carries a token in its query and is
invalid, so its members fail at start with a config error. The IMAP password is wrong
at first (Dovecot knows another one), then Dovecot is given ours and mail flows.

Then every output is searched for the secrets: the launcher's output (every child's
log lines included, at level debug), `nexus status --json` (while the login fails and
after), `nexus dlq list|show --json`, and the error output of failing CLI commands.
None may appear; each error did happen (checked), and the secrets did reach their
servers (Dovecot accepted the login, the webhook target received the bearer token).

SECRETS is the list searched: a new kind of secret (the CURVE secret key) is added there.
"""

from __future__ import annotations

import http.server
import json
import os
import shutil
import subprocess
import sys
import tempfile
import threading
from pathlib import Path

import pytest
import yaml

from nexus.testing import LaunchedPipeline, free_port, wait_for

try:
    from tests import dovecot
except ImportError:  # plain `pytest` puts tests/ itself on sys.path
    import dovecot

pytestmark = pytest.mark.skipif(
    dovecot.BINARY is None, reason="dovecot is not installed (apt-get install dovecot-imapd)"
)

REPO = Path(__file__).resolve().parents[2]
WAIT = 30.0
USER = "alice"
IMAP_PASSWORD = "Imap-Pw-9c2e71b4d8"
DOVECOT_FIRST = "not-the-configured-one"  # what Dovecot expects until it is given ours
WEBHOOK_TOKEN = "Tok-5f0a93d2e6c1b8"
QUERY_TOKEN = "Qtok-a1b2c3d4e5f607"
HTTP_TOKEN = "Http-tok-7e4c19a05b"
SECRETS = {
    "imap password": IMAP_PASSWORD,
    "webhook bearer token": WEBHOOK_TOKEN,
    "url query token": QUERY_TOKEN,
    "http token": HTTP_TOKEN,
}


class RefusingTarget(http.server.ThreadingHTTPServer):
    """Answers every POST 401, echoing the Authorization header it got."""

    daemon_threads = True

    def __init__(self):
        super().__init__(("127.0.0.1", 0), _Refuse)
        self.authorizations: list[str] = []
        self.thread = threading.Thread(target=self.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
        self.thread.start()

    def close(self) -> None:
        self.shutdown()
        self.server_close()
        self.thread.join(WAIT)


class _Refuse(http.server.BaseHTTPRequestHandler):
    timeout = WAIT

    def do_POST(self):
        self.rfile.read(int(self.headers.get("Content-Length", "0")))
        auth = self.headers.get("Authorization", "")
        self.server.authorizations.append(auth)
        # the credentials alone, without "Bearer": the rule must know them too
        body = f"unauthorized: {auth.split()[-1]!r} is not accepted here".encode()
        self.send_response(401)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args):
        pass


def cli(config: Path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "nexus", "-c", str(config), *args],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=REPO,
    )


def http_get(url: str, token: str) -> str:
    import urllib.error
    import urllib.request

    req = urllib.request.Request(url, headers={"Authorization": f"Bearer {token}"})
    try:
        with urllib.request.urlopen(req, timeout=10) as resp:
            return resp.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.read().decode()


@pytest.fixture
def root():
    path = Path(tempfile.mkdtemp(prefix="nexus-secrets-"))
    yield path
    shutil.rmtree(path, ignore_errors=True)


def test_no_secret_in_logs_status_or_errors(root):
    server = dovecot.Dovecot(users={USER: DOVECOT_FIRST})
    target = RefusingTarget()
    pipeline: LaunchedPipeline | None = None
    try:
        server.start()
        config = root / "nexus.yaml"
        http_port = free_port()
        config.write_text(
            yaml.safe_dump(
                {
                    "data_dir": "./var",
                    "log": {"level": "debug"},
                    "router": {"ingest": "ipc://{data_dir}/run/ingest", "confirm": "ipc://{data_dir}/run/confirm"},
                    "contracts_untyped": ["test.*"],
                    "restart_backoff": ["0.2s"],
                    "http": {"listen": f"127.0.0.1:{http_port}", "token": HTTP_TOKEN},
                    "producers": {
                        "mail": {
                            "kind": "imap",
                            "host": server.host,
                            "port": server.port,
                            "ssl": False,
                            "username": USER,
                            "password_env": "TEST_IMAP_PASSWORD",
                            "reconnect_max": "1s",
                        }
                    },
                    "workers": {
                        "hook": {
                            "handler": "workers.webhook:Webhook",
                            "subscribe": ["email.*", "test.*"],
                            "start": "earliest",
                            "retry": {"attempts": 1},
                            "options": {
                                "url": f"http://127.0.0.1:{target.server_address[1]}/hook",
                                "headers": {"Authorization": f"Bearer {WEBHOOK_TOKEN}"},
                                "retries": 0,
                            },
                        },
                        "badhook": {
                            "handler": "workers.webhook:Webhook",
                            "subscribe": ["none.*"],
                            "options": {"url": f"ftp://127.0.0.1/hook?token={QUERY_TOKEN}"},
                        },
                    },
                }
            )
        )
        pipeline = LaunchedPipeline(config, env={"TEST_IMAP_PASSWORD": IMAP_PASSWORD})
        pipeline.start(wait_ready=False)  # badhook never starts: the pipeline never claims ready
        pipeline.wait_members("hook", 1, WAIT)

        outputs: dict[str, str] = {}

        def status(label: str) -> dict:
            run = cli(config, "status", "--json")
            outputs[f"status --json ({label})"] = run.stdout + run.stderr
            assert run.returncode == 0, run
            return json.loads(run.stdout)

        def mail_state() -> str:
            procs = {p["name"]: p for p in status("polled")["processes"]}
            return procs.get("mail", {}).get("detail", {}).get("mailboxes", {}).get("INBOX", {}).get("state", "")

        # 1. the wrong password: refused, shown as such, retried
        wait_for(lambda: "imap_auth_failed" in pipeline.output(), WAIT, message="the IMAP login refused")
        wait_for(lambda: mail_state() == "auth_failed", WAIT, message="status showing the refused login")
        status("login refused")
        # 2. Dovecot learns our password: the next attempt logs in, and mail flows
        server.users[USER] = IMAP_PASSWORD
        (server.root / "passwd").write_text(f"{USER}:{{PLAIN}}{IMAP_PASSWORD}::::::\n")
        wait_for(lambda: "imap_connected" in pipeline.output(), WAIT, message="the IMAP login with our password")
        server.append(b"Subject: hello\r\nFrom: a@example.com\r\n\r\nbody\r\n")
        # 3. the webhook target refuses (and echoes the token): dead letters
        send = cli(config, "send", "test.ping", "--payload", '{"n": 1}')
        assert send.returncode == 0, send
        wait_for(
            lambda: (status("dead letters") or {}).get("groups", {}).get("hook", {}).get("dead_letters", 0) >= 2,
            WAIT,
            message="both events dead-lettered by the refusing webhook",
        )
        assert target.authorizations and set(target.authorizations) == {f"Bearer {WEBHOOK_TOKEN}"}
        # 4. badhook's members failed at start with a config error naming its URL
        wait_for(lambda: "group_failed" in pipeline.output(), WAIT, message="badhook failed")
        final = status("after errors")
        badhook = [p for p in final["processes"] if p["group"] == "badhook"]
        assert badhook and "must be an http:// or https:// URL" in badhook[0]["last_exit"], badhook
        # 5. the CLI: dead letters as it shows them, and failing commands
        for args in (("dlq", "list", "--json"), ("dlq", "show", "1", "--json"), ("dlq", "show", "2", "--json")):
            run = cli(config, *args)
            assert run.returncode == 0, run
            outputs[" ".join(args)] = run.stdout + run.stderr
        assert "401" in outputs["dlq show 1 --json"] + outputs["dlq show 2 --json"]
        for args in (("scale", "nosuchgroup", "1"), ("send", "nosuch.type", "--payload", "{}"), ("dlq", "show", "99")):
            run = cli(config, *args)
            assert run.returncode != 0, run
            outputs[f"error of {' '.join(args)}"] = run.stdout + run.stderr
        # 6. the HTTP port: what it answers with and without the token
        for path, token in (("/api/state", HTTP_TOKEN), ("/api/deadletters/1", HTTP_TOKEN), ("/metrics", "wrong")):
            outputs[f"GET {path}"] = http_get(f"http://127.0.0.1:{http_port}{path}", token)
        assert '"dead_letters"' in outputs["GET /api/state"] and "unauthorized" in outputs["GET /metrics"]
        broken = root / "broken.yaml"  # a config error in a file that holds the secrets
        broken.write_text(config.read_text().replace("reconnect_max", "reconect_max"))
        run = cli(broken, "status")
        assert run.returncode == 3 and "unknown key" in run.stderr, run
        outputs["config error"] = run.stderr
    finally:
        if pipeline is not None:
            pipeline.stop()
        target.close()
        server.close()
    log = pipeline.output()
    outputs["launcher output and every log line"] = log
    for expected in ("imap_auth_failed", "imap_connected", "event_dead_lettered", "group_failed", "webhook POST"):
        assert expected in log, f"{expected} not logged"
    found = [
        f"{what} in {where}" for where, text in outputs.items() for what, secret in SECRETS.items() if secret in text
    ]
    lines = sum(text.count("\n") for text in outputs.values())
    print(f"SECRETS-REPORT outputs={len(outputs)} lines={lines} secrets={len(SECRETS)} found={len(found)}")
    assert not found, "\n".join(found)
    assert os.path.exists(pipeline.output_path)
