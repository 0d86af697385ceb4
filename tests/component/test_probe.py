"""`python -m nexus.tools.probe` (the container HEALTHCHECK and the Kubernetes exec
probes) against a real HTTP server that wants a bearer token, as the launcher's HTTP
port does off loopback: the address and token come from the config and its overlay."""

from __future__ import annotations

import json
import subprocess
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from nexus.tools.probe import url_of

TOKEN = "probe-test-token-0123456789"


class Health(BaseHTTPRequestHandler):
    seen: list[tuple[str, str | None]] = []

    def do_GET(self):  # noqa: N802 - http.server's name
        Health.seen.append((self.path, self.headers.get("Authorization")))
        if self.headers.get("Authorization") != f"Bearer {TOKEN}":
            code, body = 401, {"error": "unauthorized"}
        elif self.path == "/healthz":
            code, body = 200, {"ok": True}
        elif self.path == "/readyz":
            code, body = 503, {"ok": False, "reasons": ["group work: 16 partitions unassigned"]}
        else:
            code, body = 404, {"error": "not found"}
        data = json.dumps(body).encode()
        self.send_response(code)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, *args):
        pass


@pytest.fixture
def server():
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), Health)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    Health.seen.clear()
    try:
        yield httpd.server_address[1]
    finally:
        httpd.shutdown()
        httpd.server_close()
        thread.join(10)


def probe(config, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "nexus.tools.probe", "-c", str(config), *args],
        capture_output=True,
        text=True,
        timeout=30,
    )


def test_probe_reads_address_and_token_from_the_config_and_its_overlay(server, tmp_path):
    # as in a pod: a wildcard listen address, the token in the `secret` overlay
    main = tmp_path / "router.yaml"
    main.write_text(f"data_dir: ./var\nhttp: {{listen: '0.0.0.0:{server}'}}\n")
    (tmp_path / "secret.yaml").write_text(f"http: {{token: {TOKEN}}}\n")

    healthy = probe(main, "/healthz", "--env", "secret")
    assert healthy.returncode == 0, healthy.stderr
    assert "200" in healthy.stdout
    assert Health.seen[-1] == ("/healthz", f"Bearer {TOKEN}")

    not_ready = probe(main, "/readyz", "--env", "secret")
    assert not_ready.returncode == 1
    assert "503" in not_ready.stderr and "partitions unassigned" in not_ready.stderr  # the reason, one line
    assert TOKEN not in not_ready.stderr + not_ready.stdout

    without_token = probe(main, "/healthz")  # no overlay: no token
    assert without_token.returncode == 1 and "401" in without_token.stderr


def test_probe_fails_with_one_line_when_nothing_answers_or_http_is_off(tmp_path):
    from nexus.testing import free_port

    closed = tmp_path / "closed.yaml"
    closed.write_text(f"data_dir: ./var\nhttp: {{listen: '127.0.0.1:{free_port()}'}}\n")
    result = probe(closed)
    assert result.returncode == 1 and len(result.stderr.strip().splitlines()) == 1, result.stderr
    off = tmp_path / "off.yaml"
    off.write_text("data_dir: ./var\nhttp: {listen: ''}\n")
    result = probe(off)
    assert result.returncode == 1 and "http.listen is off" in result.stderr
    missing = probe(tmp_path / "nope.yaml")
    assert missing.returncode == 3 and "config file not found" in missing.stderr


def test_wildcard_listen_addresses_are_probed_on_loopback():
    assert url_of("0.0.0.0:9464", "/healthz") == "http://127.0.0.1:9464/healthz"
    assert url_of("[::]:9464", "readyz") == "http://[::1]:9464/readyz"
    assert url_of("10.0.0.5:9464", "/healthz") == "http://10.0.0.5:9464/healthz"
