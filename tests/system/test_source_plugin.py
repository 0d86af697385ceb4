"""A source kind from another package (issue 11, point 3): examples/nexus-source-ticker,
installed with pip into tmp_path only, runs under `producers:` like a built-in kind, and
a typo in its options stops `python -m nexus.launch` like any config error."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import recorder_group, write_config
from recorder import read_handled

from nexus.errors import ExitCode
from nexus.testing import wait_for

EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "nexus-source-ticker"


@pytest.fixture
def ticker_site(tmp_path, monkeypatch) -> Path:
    """The example installed into tmp_path/site, on the path of this process (its config
    is loaded here too) and of every process the launcher starts."""
    source = tmp_path / "ticker-src"  # pip builds in the source folder: a copy keeps the repo clean
    shutil.copytree(EXAMPLE, source, ignore=shutil.ignore_patterns("build", "*.egg-info", "__pycache__"))
    site = tmp_path / "site"
    subprocess.run(
        [sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--no-build-isolation", "--target", site, source],
        check=True,
        capture_output=True,
        timeout=300,
        env={**os.environ, "PIP_DISABLE_PIP_VERSION_CHECK": "1", "PIP_NO_INDEX": "1"},
    )
    assert (site / "nexus_source_ticker.py").exists()
    monkeypatch.syspath_prepend(str(site))
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([str(site), os.environ.get("PYTHONPATH", "")]))
    yield site
    sys.modules.pop("nexus_source_ticker", None)


def ticker_config(directory: Path, out: Path, beat: dict) -> Path:
    return write_config(
        directory,
        contracts=["nexus.contracts", "nexus_source_ticker"],  # the plugin's event type
        producers={"beat": {"kind": "ticker", **beat}},
        workers={"rec": recorder_group(out, subscribe=["example.tick"])},
    )


def test_plugin_source_events_reach_a_worker_group(ticker_site, tmp_path, launched):
    out = tmp_path / "out"
    p = launched(ticker_config(tmp_path / "run", out, {"every": "50ms"}))
    assert {x["name"]: x["role"] for x in p.processes()}["beat"] == "producer"
    wait_for(lambda: len(read_handled(str(out))) >= 3, 30, message="3 ticks handled")
    rows = read_handled(str(out))
    assert len({row[1] for row in rows}) == len(rows)  # distinct events

    # what `nexus status` shows: the runner's count and the source's own status()
    def beat_detail() -> dict:
        return next(x for x in p.processes() if x["name"] == "beat").get("detail") or {}

    detail = wait_for(lambda: (d := beat_detail()).get("emitted", 0) >= 3 and d, 10, message="the status detail")
    assert detail["every"] == pytest.approx(0.05)


def test_plugin_option_typo_is_one_config_error_line(ticker_site, tmp_path):
    path = ticker_config(tmp_path / "run", tmp_path / "out", {"every": "50ms", "evry": "1s"})
    result = subprocess.run(
        [sys.executable, "-m", "nexus.launch", "-c", str(path)], capture_output=True, text=True, timeout=60
    )
    assert result.returncode == ExitCode.CONFIG
    assert result.stderr.strip().splitlines() == [f"nexus: {path.resolve()}: producers.beat.evry: unknown key"]


def test_without_the_plugin_the_kind_is_unknown(tmp_path):
    path = ticker_config(tmp_path / "run", tmp_path / "out", {"every": "50ms"})
    result = subprocess.run(
        [sys.executable, "-m", "nexus.launch", "-c", str(path)], capture_output=True, text=True, timeout=60
    )
    assert result.returncode == ExitCode.CONFIG
    [line] = result.stderr.strip().splitlines()
    assert line.startswith(f"nexus: {path.resolve()}: producers.beat.kind: unknown kind 'ticker' (installed: ")
    assert "schedule" in line and "file" in line and "imap" in line
