"""The default config's demo: heartbeat ticks and files dropped in the inbox reach the console worker."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from nexus.testing import LaunchedPipeline, wait_for

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
