"""The launcher's own nats-server (`engine: nats` with `nats.embedded_server: true`):
one JetStream node on the host and port of `nats.servers[0]`, its store under
{data_dir}/nats. Started before the router (the ingest process), restarted when it
dies, stopped after every child has stopped; it shows in `nexus status` as "nats".

Not a multiprocessing child: a plain subprocess in its own session (a terminal's Ctrl-C
reaches the launcher, which stops it last), which the kernel sends SIGTERM if the
launcher dies (JetStream then closes its store cleanly)."""

from __future__ import annotations

import functools
import ipaddress
import os
import signal
import socket
import subprocess
import time
from pathlib import Path
from urllib.parse import urlsplit

import structlog

from nexus.common import process
from nexus.common.backoff import backoff_delay
from nexus.config import Config
from nexus.errors import ConfigError
from nexus.jetstream.localserver import NatsNode, binary

log = structlog.get_logger("nexus.launch")

NAME = "nats"  # its name in `nexus status` and its files under {data_dir}/nats


def address(cfg: Config) -> tuple[str, int]:
    """Host and port of `nats.servers[0]` (4222 when the URL names none)."""
    url = urlsplit(cfg.nats.servers[0])
    return url.hostname or "127.0.0.1", url.port or 4222


def _port_taken(host: str, port: int) -> bool:
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host, port))
        except OSError:
            return True
    return False


class EmbeddedServer:
    def __init__(self, cfg: Config):
        host, port = address(cfg)
        self.url = cfg.nats.servers[0]
        self.node = NatsNode(NAME, port, os.path.join(cfg.data_dir, "nats"), host=host)
        self.backoff = cfg.restart_backoff
        self.restarts = 0
        self.crashes = 0  # in a row: the backoff grows with them, a start that listens resets it
        self.started = 0.0
        self.restart_at = 0.0
        self.last_exit = ""
        self.stopping = False

    @property
    def pid(self) -> int | None:
        return self.node.proc.pid if self.node.proc is not None else None

    def check(self) -> None:
        """Before anything starts: one line (exit 3) for a URL it cannot serve, a missing
        binary or a taken port."""
        if self.url.startswith("tls://"):
            raise ConfigError(f"nats.embedded_server: serves plain nats:// only (nats.servers[0] is {self.url})")
        try:
            loopback = ipaddress.ip_address(socket.gethostbyname(self.node.host)).is_loopback
        except OSError as exc:
            raise ConfigError(f"nats.embedded_server: cannot resolve {self.node.host} ({exc})") from None
        if not loopback:
            # it has no TLS and no users: reachable from other hosts, anyone could read and write
            raise ConfigError(
                f"nats.embedded_server: listens on loopback only (nats.servers[0] is {self.url}); "
                "run a cluster of your own for other hosts"
            )
        binary()
        if _port_taken(self.node.host, self.node.port):
            raise ConfigError(
                f"nats.embedded_server: {self.node.host}:{self.node.port} (nats.servers[0]) is taken; "
                "stop what listens there or name a free port"
            )

    def start(self) -> None:
        node = self.node
        os.makedirs(node.store, exist_ok=True)
        conf = os.path.join(node.store, f"{node.name}.conf")
        Path(conf).write_text(node.conf())
        with open(node.log_path, "ab") as out:
            node.proc = subprocess.Popen(
                [binary(), "-c", conf],
                stdout=out,
                stderr=subprocess.STDOUT,
                cwd=node.store,
                start_new_session=True,
                # (in the forked child, before exec) SIGTERM when the launcher dies
                preexec_fn=functools.partial(process.die_with_parent, os.getpid(), signal.SIGTERM),
            )
        self.started = time.time()
        log.info("process_started", name=NAME, role="nats", pid=node.proc.pid, listen=node.url)

    def wait_listening(self) -> None:
        try:
            self.node.wait_listening()
        except RuntimeError as exc:
            self.stop()
            raise ConfigError(f"nats.embedded_server: {exc}") from None
        self.crashes = 0

    def tick(self, now: float) -> None:
        """From the supervision loop: a server that died is started again after a backoff."""
        if self.stopping or self.node.proc is None:
            return
        if self.restart_at:
            if now >= self.restart_at:
                self.restart_at = 0.0
                self.restarts += 1
                self.start()
            return
        code = self.node.proc.poll()
        if code is None:
            if self.crashes and time.time() - self.started > 10:
                self.crashes = 0  # up a while: the next death starts the backoff afresh
            return
        self.crashes += 1
        self.last_exit = f"exit {code}" if code >= 0 else f"signal {-code}"
        delay = backoff_delay(self.backoff, self.crashes)
        self.restart_at = now + delay
        log.warning(
            "process_crashed", name=NAME, exit_code=code, restart_in=delay, log_tail=self.node.tail(300).strip()
        )

    def stop(self) -> None:
        self.stopping = True
        if self.node.proc is not None and self.node.proc.poll() is None:
            self.node.stop()
            log.info("process_stopped", name=NAME, exit_code=self.node.proc.returncode)

    def describe(self) -> dict:
        alive = self.node.alive()
        state = "running" if alive else ("backoff" if self.restart_at else "stopped")
        return {
            "name": NAME,
            "role": "nats",
            "group": "",
            "pid": self.pid if alive else None,
            "state": state,
            "restarts": self.restarts,
            "uptime": round(time.time() - self.started, 1) if alive else 0.0,
            "last_exit": self.last_exit,
            "detail": {"listen": self.node.url, "store": self.node.store},
        }
