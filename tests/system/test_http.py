"""System tests of the HTTP port: the launcher's http child, /healthz, /readyz, /metrics,
the token (set, or generated in the data dir) and `nexus dashboard`, the Host and CSRF
checks, `nexus status`'s verdict, the cap on open streams, shared scrapes, and the
refusals of a bad `http.listen` at start."""

from __future__ import annotations

import json
import os
import signal
import socket
import stat
import subprocess
import sys
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from http.client import HTTPConnection, HTTPResponse
from pathlib import Path

import pytest
from conftest import recorder_group, write_config
from prometheus_client.parser import text_string_to_metric_families

from nexus.errors import ExitCode
from nexus.http.dashboard import MAX_STREAMS
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

        # the token: every request but the probes', compared as a whole
        assert http(f"{base}/metrics", token=TOKEN + "x")[0] == 401
        for path_ in ("/", "/metrics", "/api/state", "/api/deadletters"):
            assert http(f"{base}{path_}", token=None)[0] == 401, path_
        for path_ in ("/healthz", "/readyz"):  # load balancers and Kubernetes httpGet send none
            assert http(f"{base}{path_}", token=None)[:3:2] == (200, '{"ok": true, "reasons": []}'), path_

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
        # behind a TLS-terminating proxy the page's origin is https://: the same host and port pass
        assert http(action, method="POST", body=body_, Origin=f"https://127.0.0.1:{port}", **json_type)[0] == 200
        assert http(action, method="POST", body=body_, Origin=f"https://127.0.0.1:{port + 1}", **json_type)[0] == 403
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


def stream(port: int, token: str) -> tuple[HTTPConnection, HTTPResponse]:
    """An open dashboard stream (/api/stream), its headers read, its body left flowing."""
    conn = HTTPConnection("127.0.0.1", port, timeout=10)
    conn.request("GET", "/api/stream", headers={"Authorization": f"Bearer {token}"})
    return conn, conn.getresponse()


def test_generated_token_dashboard_command_and_limits(tmp_path):
    """No http.token: the launcher makes one in the data dir (0600), every route but the
    probes wants it, `nexus dashboard` prints the link, a restart keeps it. Also: open
    streams are capped, concurrent scrapes share one answer."""
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    path = write_config(
        tmp_path, http={"listen": f"127.0.0.1:{port}"}, workers={"rec": recorder_group(tmp_path / "out")}
    )
    cli = [sys.executable, "-m", "nexus", "dashboard", "-c", str(path)]
    with LaunchedPipeline(path) as p:
        file = Path(p.cfg.data_dir) / "http.token"
        assert stat.S_IMODE(file.stat().st_mode) == 0o600
        token = file.read_text().strip()
        wait_for(lambda: http(f"{base}/readyz", token=None)[0] == 200, 20, 0.1, "/readyz 200 without a token")
        assert [http(f"{base}{path_}", token=None)[0] for path_ in ("/", "/metrics", "/api/state")] == [401] * 3
        assert http(f"{base}/metrics", token=token)[0] == 200

        # `nexus dashboard`: the link (it opens the page and its session) and Prometheus' config
        shown = subprocess.run(cli, capture_output=True, text=True, timeout=30)
        assert shown.returncode == 0, shown.stderr
        assert f"dashboard: {base}/?token={token}" in shown.stdout and "credentials_file" in shown.stdout
        link = subprocess.run([*cli, "--url"], capture_output=True, text=True, timeout=30).stdout.strip()
        status, headers, page = http(link, token=None)
        assert status == 200 and "<title>Nexus</title>" in page and "nexus_session=" in headers["Set-Cookie"]

        # the open streams are capped; one more is refused with one line until one closes
        opened = [stream(port, token) for _ in range(MAX_STREAMS)]
        try:
            assert {resp.status for _, resp in opened} == {200}
            conn, refused = stream(port, token)
            assert refused.status == 503 and refused.read().decode().count("\n") == 1
            conn.close()
            opened.pop()[0].close()

            def one_more() -> bool:
                conn, resp = stream(port, token)
                conn.close()
                return resp.status == 200

            wait_for(one_more, 20, 0.2, "a stream again once one closed")
        finally:
            for conn, _ in opened:
                conn.close()

        # scrapes at the same moment share one answer (byte for byte: uptimes move otherwise)
        with ThreadPoolExecutor(4) as pool:
            bodies = list(pool.map(lambda _: http(f"{base}/metrics", token=token)[2], range(4)))
        assert len(set(bodies)) == 1 and "nexus_ready 1.0" in bodies[0]
    out = p.output()
    assert "nexus dashboard" in out and token not in out  # where the dashboard is, never the token

    # a restart keeps the token: Prometheus' credentials_file and the link stay good
    with LaunchedPipeline(path) as again:
        assert file.read_text().strip() == token
        wait_for(lambda: http(f"{base}/healthz", token=None)[0] == 200, 20, 0.1, "/healthz 200")
        assert http(f"{base}/metrics", token=token)[0] == 200

        # `nexus reload` applies a new address and token: the HTTP process restarts on them
        reload = [sys.executable, "-m", "nexus", "reload", "-c", str(path)]
        moved_port, new_token = free_port(), "reloaded-token-" + "r" * 32
        moved = f"http://127.0.0.1:{moved_port}"
        workers = {"rec": recorder_group(tmp_path / "out")}
        write_config(tmp_path, http={"listen": f"127.0.0.1:{moved_port}", "token": new_token}, workers=workers)
        done = subprocess.run(reload, capture_output=True, text=True, timeout=90)
        assert done.returncode == 0 and f"http: the HTTP process restarts on 127.0.0.1:{moved_port}" in done.stdout
        wait_for(lambda: http(f"{moved}/metrics", token=new_token)[0] == 200, 20, 0.1, "/metrics on the new port")
        assert http(f"{moved}/metrics", token=token)[0] == 401  # the old token is no longer good
        assert http(f"{base}/healthz", token=None)[0] == 0  # nothing listens on the old port any more
        # a new address that is taken is refused with one line; the port keeps running
        with socket.socket() as taken:
            taken.bind(("127.0.0.1", 0))
            taken.listen(1)
            busy = f"127.0.0.1:{taken.getsockname()[1]}"
            write_config(tmp_path, http={"listen": busy, "token": new_token}, workers=workers)
            refused = subprocess.run(reload, capture_output=True, text=True, timeout=90)
        assert refused.returncode == ExitCode.CONFIG and refused.stderr.count("\n") == 1, refused.stderr
        assert "cannot bind" in refused.stderr and "nothing was applied" in refused.stderr
        assert http(f"{moved}/metrics", token=new_token)[0] == 200
    assert token not in again.output() and new_token not in again.output()


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
