"""The launcher's own nats-server (`nats.embedded_server`, nexus/supervisor/natsserver.py):
a real nats-server started, restarted after a SIGKILL, stopped; a taken port is one line."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time

import pytest

from nexus import config as config_mod
from nexus.errors import ConfigError
from nexus.jetstream.localserver import _port_open, free_ports
from nexus.supervisor.natsserver import EmbeddedServer
from nexus.testing import pid_alive, wait_for


def _config(tmp_path, port: int) -> str:
    from conftest import write_config

    path = write_config(
        tmp_path / "cfg",
        engine="nats",
        nats={"servers": [f"nats://127.0.0.1:{port}"], "embedded_server": True, "stream": "E"},
        restart_backoff=["0.1s", "0.2s"],
    )
    return str(path)


def test_started_listening_restarted_after_sigkill_and_stopped(tmp_path):
    port = free_ports(1)[0]
    cfg = config_mod.load(_config(tmp_path, port))
    server = EmbeddedServer(cfg)
    server.check()
    try:
        server.start()
        server.wait_listening()
        first = server.pid
        row = server.describe()
        assert (row["name"], row["role"], row["state"], row["pid"]) == ("nats", "nats", "running", first)
        assert row["detail"]["store"] == os.path.join(cfg.data_dir, "nats")
        os.kill(first, signal.SIGKILL)
        # the launcher's loop ticks; the server is started again after the backoff
        wait_for(lambda: server.tick(time.monotonic()) or (server.pid != first and server.node.alive()), 10)
        wait_for(lambda: _port_open("127.0.0.1", port), 10, 0.05, "the restarted server listening")
        assert server.restarts == 1 and server.last_exit == "signal 9"
        assert os.path.isdir(os.path.join(cfg.data_dir, "nats", "js"))
    finally:
        server.stop()
    assert not pid_alive(server.pid) and not _port_open("127.0.0.1", port)
    assert server.describe()["state"] == "stopped"


def test_a_taken_port_is_one_line_and_the_launcher_exits_3(tmp_path):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        path = _config(tmp_path, port)
        with pytest.raises(
            ConfigError, match=rf"nats.embedded_server: 127.0.0.1:{port} \(nats.servers\[0\]\) is taken"
        ):
            EmbeddedServer(config_mod.load(path)).check()
        proc = subprocess.run(
            [sys.executable, "-m", "nexus.launch", "-c", path], capture_output=True, text=True, timeout=60
        )
    assert proc.returncode == 3, proc.stderr
    assert proc.stderr.strip().splitlines() == [
        f"nexus: nats.embedded_server: 127.0.0.1:{port} (nats.servers[0]) is taken; stop what listens there or "
        "name a free port"
    ]


@pytest.mark.parametrize(
    "url,message",
    [
        ("tls://127.0.0.1:4222", "nats.embedded_server: serves plain nats:// only (nats.servers[0] is tls://"),
        ("nats://0.0.0.0:4222", "nats.embedded_server: listens on loopback only (nats.servers[0] is nats://0.0.0.0"),
    ],
)
def test_a_url_it_cannot_serve_safely_is_one_line(tmp_path, url, message):
    from conftest import write_config

    path = write_config(tmp_path / "cfg", engine="nats", nats={"servers": [url], "embedded_server": True})
    with pytest.raises(ConfigError) as info:
        EmbeddedServer(config_mod.load(str(path))).check()
    assert str(info.value).startswith(message)
