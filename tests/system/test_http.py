"""System tests of the HTTP port: the launcher's http child, /healthz, /readyz, /metrics,
the token, the Host and CSRF checks, `nexus status`'s verdict, and the refusals of a
bad `http.listen` at start. One launched pipeline serves every check that needs one."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import urllib.error
import urllib.request
from pathlib import Path

import pytest
from conftest import recorder_group, write_config
from prometheus_client.parser import text_string_to_metric_families

from nexus.errors import ExitCode
from nexus.testing import LaunchedPipeline, free_port, wait_for

pytestmark = pytest.mark.system

TOKEN = "test-token-7f3a"


def http(url: str, token: str | None = TOKEN, method: str = "GET", body: bytes | None = None, **headers: str):
    """(status, headers, body text) of one real HTTP request; 4xx/5xx are answers too,
    a refused connection is status 0 (the http child not listening yet)."""
    req = urllib.request.Request(url, data=body, method=method)
    if token is not None:
        req.add_header("Authorization", f"Bearer {token}")
    for name, value in headers.items():
        req.add_header(name.replace("_", "-"), value)
    try:
        with urllib.request.urlopen(req, timeout=10) as resp:
            return resp.status, dict(resp.headers), resp.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, dict(exc.headers), exc.read().decode()
    except urllib.error.URLError as exc:
        return 0, {}, str(exc.reason)


def probe(config: Path, path: str) -> subprocess.CompletedProcess:
    """`python -m nexus.tools.probe`, the container HEALTHCHECK and Kubernetes exec probe."""
    cmd = [sys.executable, "-m", "nexus.tools.probe", "-c", str(config), path]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=30)


def process(p: LaunchedPipeline, name: str) -> dict:
    return next(proc for proc in p.processes() if proc["name"] == name)


def test_health_metrics_and_security(tmp_path):
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    listen = {"listen": f"127.0.0.1:{port}", "token": TOKEN}
    path = write_config(tmp_path, http=listen, workers={"rec": recorder_group(tmp_path / "out")})
    with LaunchedPipeline(path) as p:
        child = process(p, "http")
        assert child["role"] == "http" and child["state"] == "running" and child["pid"]
        # the http child may still be importing when the pipeline is ready
        wait_for(lambda: http(f"{base}/readyz")[0] == 200, 20, 0.1, "/readyz 200")
        status, _, body = http(f"{base}/healthz")
        assert (status, json.loads(body)) == (200, {"ok": True, "reasons": []})

        # the token: every request, compared as a whole
        assert http(f"{base}/healthz", token=None)[0] == 401
        assert http(f"{base}/metrics", token=TOKEN + "x")[0] == 401
        assert http(f"{base}/", token=None)[0] == 401

        # one scrape: Prometheus text that prometheus_client's parser reads
        status, headers, text = http(f"{base}/metrics")
        assert status == 200 and headers["Content-Type"].startswith("text/plain")
        families = {f.name: f for f in text_string_to_metric_families(text)}
        assert [s.value for s in families["nexus_ready"].samples] == [1.0]
        up = {s.labels["name"]: s.value for s in families["nexus_process_up"].samples}
        assert up == {"launcher": 1.0, "router": 1.0, "http": 1.0, "rec-0": 1.0}
        # the router's and the member's series come through the same scrape
        assert "nexus_journal_bytes" in families and "nexus_handler_duration_seconds" in families

        # actions: Host must name this server (DNS rebinding), JSON only, same origin (CSRF)
        action = f"{base}/api/deadletters/purge"
        body_ = b'{"ids": [999]}'
        json_type = {"Content_Type": "application/json"}
        status, _, text = http(action, method="POST", body=body_, Host=f"evil.example:{port}", **json_type)
        assert status == 403 and "Host" in text
        assert http(action, method="POST", body=body_, Origin="http://evil.example", **json_type)[0] == 403
        assert http(action, method="POST", body=b"ids=999", Content_Type="application/x-www-form-urlencoded")[0] == 415
        status, _, text = http(action, method="POST", body=body_, Origin=base, **json_type)
        assert (status, json.loads(text)) == (200, {"ok": True, "purged": 0})  # passed the checks, asked the router
        assert http(f"{base}/healthz", Host=f"rebound.example:{port}")[0] == 403  # reads too

        # `nexus status` prints the same verdict
        cli = [sys.executable, "-m", "nexus", "status", "-c", str(path)]
        result = subprocess.run(cli, capture_output=True, text=True, timeout=30)
        assert result.returncode == 0, result.stderr
        assert "health: live, ready" in result.stdout.splitlines()
        data = json.loads(subprocess.run([*cli, "--json"], capture_output=True, text=True, timeout=30).stdout)
        assert data["health"] == {"live": True, "ready": True, "reasons": []}

        # the router does not answer (stopped, not dead: deterministic): 503 with the reason
        router = process(p, "router")["pid"]
        os.kill(router, signal.SIGSTOP)
        try:
            status, _, body = http(f"{base}/healthz")
            assert status == 503 and json.loads(body) == {"ok": False, "reasons": ["router not answering"]}
            status, _, body = http(f"{base}/readyz")
            assert status == 503 and "router not answering" in json.loads(body)["reasons"]
            # the containers' probe (deploy/), reading address and token from the config
            down = probe(path, "/readyz")
            assert down.returncode == 1 and "router not answering" in down.stdout + down.stderr
        finally:
            os.kill(router, signal.SIGCONT)
        wait_for(lambda: http(f"{base}/readyz")[0] == 200, 20, 0.1, "/readyz 200 again")
        up_again = probe(path, "/readyz")
        assert up_again.returncode == 0, up_again.stdout + up_again.stderr

        # a crashed http child is restarted like any other
        os.kill(child["pid"], signal.SIGKILL)
        wait_for(lambda: process(p, "http")["pid"] not in (None, child["pid"]), 20, 0.05, "http restarted")
        wait_for(lambda: http(f"{base}/healthz")[0] == 200, 20, 0.1, "/healthz 200 from the new http child")
        assert process(p, "http")["restarts"] == 1
    out = p.output()
    # stopped first: it is gone before any member stops
    assert out.index("http_stopped") < out.index("member_stopped")
    assert TOKEN not in out


@pytest.mark.parametrize(
    ("listen", "token", "expected"),
    [
        ("taken", "", "cannot bind"),
        ("127.0.0.1", "", "expected host:port"),
        ("0.0.0.0:{port}", "", "set http.token"),
    ],
)
def test_bad_listen_is_one_line_exit_3(tmp_path, listen, token, expected):
    with socket.socket() as occupant:
        occupant.bind(("127.0.0.1", 0))
        occupant.listen()
        port = occupant.getsockname()[1]
        address = f"127.0.0.1:{port}" if listen == "taken" else listen.format(port=free_port())
        path = write_config(tmp_path, http={"listen": address, "token": token})
        result = subprocess.run(
            [sys.executable, "-m", "nexus.launch", "-c", str(path)], capture_output=True, text=True, timeout=60
        )
    assert result.returncode == ExitCode.CONFIG, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("nexus: http.listen") and expected in lines[0], lines
    assert not (tmp_path / "var" / "run" / "control").exists()  # refused before anything started
