"""The shell commands of README "Producers that speak HTTP" and docs/http-gateway.md, run
as written (bash, the `nexus` command of this tree) against a launched pipeline with the
gateway; only the documented port 8080 is replaced by a free one."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest
from gateway_support import curl, gateway_config, wait_up

from nexus.testing import LaunchedPipeline, wait_for

pytestmark = pytest.mark.system

ROOT = Path(__file__).parent.parent.parent


def blocks(path: Path, lang: str, start: str = "", end: str = "") -> list[str]:
    text = path.read_text()
    if start:
        text = text[text.index(start) : text.index(end)]
    return re.findall(rf"```{lang}\n(.*?)```", text, re.S)


def run(script: str, cwd: Path, port: int) -> str:
    prelude = f'set -euo pipefail\nnexus() {{ "{sys.executable}" -m nexus "$@"; }}\n'
    script = prelude + script.replace("127.0.0.1:8080", f"127.0.0.1:{port}")
    out = subprocess.run(
        ["bash", "-c", script],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=120,
        env={"PATH": "/usr/bin:/bin", "PYTHONPATH": str(ROOT), "NEXUS_CONFIG": str(cwd / "nexus.yaml")},
    )
    assert out.returncode == 0, (script, out.stdout, out.stderr)
    return out.stdout


def test_documented_commands_work_as_written(tmp_path):
    path, base = gateway_config(tmp_path)
    assert path == tmp_path / "nexus.yaml"  # the name the README's `-c nexus.yaml` uses
    port = int(base.rsplit(":", 1)[1])
    (docs_sh,) = blocks(ROOT / "docs" / "http-gateway.md", "sh")
    (readme_bash,) = blocks(ROOT / "README.md", "bash", "## Producers that speak HTTP", "## Configuration")
    with LaunchedPipeline(path):
        wait_up(base)
        # docs/http-gateway.md: create two tokens, list them, revoke one (no -c: NEXUS_CONFIG)
        out = run(docs_sh, tmp_path, port)
        tokens = [line for line in out.splitlines() if line.startswith("nxg_")]
        assert len(tokens) == 2, out  # each token printed once, by its create
        listed = out.split(tokens[1], 1)[1]
        assert re.search(r"^parrot +\S+ +50\.0 +sources parrot\*; types parrot\.\*$", listed, re.M), listed
        assert re.search(r"^tail +\S+ +- +subscribe mail\.\*$", listed, re.M), listed
        assert "sha256" not in listed
        # "a running gateway answers 401 to it within a second"
        wait_for(lambda: curl(f"{base}/v1/events", "{}", tokens[0])[0] == 401, 5, 0.1, "the revoked token refused")
        # README: create a token and send the Parrot event with curl; the answer as the comment shows it
        out = run(readme_bash, tmp_path, port)
        shown = re.search(r"^# (\{.*\})$", readme_bash, re.M).group(1)
        assert out.strip().endswith(shown), out
