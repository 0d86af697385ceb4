"""The default config's demo: heartbeat ticks and files dropped in the inbox reach the console worker."""

from __future__ import annotations

import subprocess
import sys
import urllib.error
import urllib.request
from pathlib import Path

import pytest
import yaml

from nexus.testing import LaunchedPipeline, free_port, wait_for

pytestmark = pytest.mark.system
DEFAULT = Path(__file__).resolve().parents[2] / "config" / "default.yaml"


def test_default_config_demo(tmp_path):
    cfg = yaml.safe_load(DEFAULT.read_text())
    # same config, moved into the test's directory: no fixed TCP ports, no shared ./var
    cfg["data_dir"] = "./var"
    cfg["router"]["ingest"] = "ipc://{data_dir}/run/ingest"
    cfg["router"]["confirm"] = "ipc://{data_dir}/run/confirm"
    cfg["producers"]["heartbeat"]["every"] = "1s"
    cfg["producers"]["inbox"]["paths"] = ["./inbox"]
    port = free_port()
    cfg["http"] = {"listen": f"127.0.0.1:{port}"}  # the default port (9464), on a free one
    path = tmp_path / "default.yaml"
    path.write_text(yaml.safe_dump(cfg))
    with LaunchedPipeline(path) as pipeline:
        wait_for(
            lambda: "schedule.tick from schedule:heartbeat" in pipeline.output(),
            15,
            message="a heartbeat tick printed by the console worker",
        )
        # the producer logs file_watch_started once its inotify watches are in place
        wait_for(lambda: "file_watch_started" in pipeline.output(), 15, message="watcher started")
        (tmp_path / "inbox" / "hello.txt").write_text("hello")
        wait_for(
            lambda: "file.created from file:inbox" in pipeline.output() and "hello.txt" in pipeline.output(),
            15,
            message="file.created printed",
        )
        lines = [line for line in pipeline.output().splitlines() if "file.created" in line]
        assert "hello.txt" in lines[0] and '"size":5' in lines[0]
        # the HTTP port of the default config: ready, and the dashboard page at the link
        # `nexus dashboard` prints (the token the launcher made: none without it)
        wait_for(lambda: _get(f"http://127.0.0.1:{port}/readyz")[0] == 200, 15, 0.1, "/readyz 200")
        assert _get(f"http://127.0.0.1:{port}/")[0] == 401
        cli = [sys.executable, "-m", "nexus", "dashboard", "--url", "-c", str(path)]
        link = subprocess.run(cli, capture_output=True, text=True, timeout=30)
        assert link.returncode == 0 and link.stdout.startswith(f"http://127.0.0.1:{port}/?token="), link
        status, page = _get(link.stdout.strip())
        assert status == 200 and "<title>Nexus</title>" in page


def _get(url: str) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(url, timeout=10) as resp:
            return resp.status, resp.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode()
    except urllib.error.URLError as exc:  # not listening yet
        return 0, str(exc.reason)
