"""Helpers for tests of Nexus and of code built on it (shipped in the package)."""

from __future__ import annotations

import socket
import subprocess
import time
from collections.abc import Callable
from typing import IO, TYPE_CHECKING, Any

from nexus.errors import PeerError
from nexus.protocol.client import ControlClient, CoordClient
from nexus.protocol.curve import client_keys
from nexus.protocol.wire import ControlReply, ControlRequest

if TYPE_CHECKING:
    from nexus.config import Config


def wait_for(
    condition: Callable[[], Any], timeout: float = 10.0, interval: float = 0.01, message: str = "condition"
) -> Any:
    """Poll `condition` until it returns a truthy value; raise TimeoutError at the deadline."""
    deadline = time.monotonic() + timeout
    while True:
        value = condition()
        if value:
            return value
        if time.monotonic() >= deadline:
            raise TimeoutError(f"timed out after {timeout:g}s waiting for {message}")
        time.sleep(interval)


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return s.getsockname()[1]


class CollectingSink:
    """A stand-in for the producer sink in unit tests of producer modules."""

    def __init__(self) -> None:
        import threading

        self.events: list[tuple[str, Any, str | None]] = []
        self.flushes = 0
        self._lock = threading.Lock()

    def emit(self, type: str, payload: Any, key: str | None = None, priority: int = 5) -> str:
        with self._lock:
            self.events.append((type, payload, key))
            return f"id-{len(self.events)}"

    def flush(self, timeout: float = 30.0) -> None:
        self.flushes += 1

    def of_type(self, type_: str) -> list[Any]:
        with self._lock:
            return [p for t, p, _ in self.events if t == type_]


class LaunchedPipeline:
    """`python -m nexus.launch` in a subprocess, for system tests and benchmarks.

    Always use it as a context manager (or call stop()): the process group is
    terminated, then killed, and its output is kept in `output_path`.
    """

    def __init__(self, config_path: str, env: dict | None = None, output_path: str | None = None):
        import os

        self.config_path = str(config_path)
        self.env = dict(os.environ, **(env or {}))
        self.output_path = output_path or f"{self.config_path}.launch.log"
        self.proc: subprocess.Popen[bytes] | None = None
        self._out: IO[bytes] | None = None
        self._cfg: Config | None = None

    @property
    def cfg(self) -> Config:
        """The config as it was when first read (endpoints), like the launcher's: a test
        may break the file on disk meanwhile."""
        if self._cfg is None:
            from nexus import config as config_mod

            self._cfg = config_mod.load(self.config_path)
        return self._cfg

    def start(self, wait_ready: bool = True, timeout: float = 30.0) -> LaunchedPipeline:
        import sys

        _ = self.cfg  # read before anything can change the file
        self._out = open(self.output_path, "ab")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "nexus.launch", "-c", self.config_path],
            stdout=self._out,
            stderr=subprocess.STDOUT,
            env=self.env,
        )
        if wait_ready:
            try:
                self.wait_ready(timeout)
            except BaseException:
                self.stop()  # never leave a half-started process group behind
                raise
        return self

    def output(self) -> str:
        with open(self.output_path, "rb") as f:
            return f.read().decode(errors="replace")

    def control(self, cmd: str, timeout: float = 3.0, **kw: Any) -> ControlReply | None:
        """The launcher's reply to `cmd` (status, scale, stop, reload); None when it does not answer."""
        try:
            return ControlClient(self.cfg.control_endpoint, timeout, curve=client_keys(self.cfg)).request(
                ControlRequest(cmd, **kw)
            )
        except PeerError:
            return None

    def router_status(self, timeout: float = 3.0) -> dict | None:
        """The router's status; None when it does not answer."""
        try:
            return CoordClient(self.cfg.coord, timeout, curve=client_keys(self.cfg)).status()
        except PeerError:
            return None

    def processes(self) -> list[dict]:
        reply = self.control("status")
        return reply["processes"] if reply else []

    def wait_ready(self, timeout: float = 30.0) -> None:
        proc = self.proc
        if proc is None:
            raise RuntimeError("the pipeline was not started")

        def ready():
            if proc.poll() is not None:
                raise RuntimeError(f"launcher exited with {proc.returncode}:\n{self.output()[-3000:]}")
            reply = self.control("status", timeout=0.5)
            return reply is not None and reply.get("ready")

        wait_for(ready, timeout, 0.05, "pipeline ready")

    def wait_members(self, group: str, n: int, timeout: float = 30.0) -> None:
        def joined():
            status = self.router_status(0.5)
            if not status:
                return False
            g = status["groups"][group]
            return len(g["members"]) == n and g["unassigned"] == 0

        wait_for(joined, timeout, 0.05, f"{n} members in group {group}")

    def child_pids(self) -> list[int]:
        return [p["pid"] for p in self.processes() if p["pid"]]

    def stop(self, timeout: float = 60.0) -> int:
        proc = self.proc
        if proc is None:
            return 0
        code = terminate(proc, timeout)
        if self._out is not None:
            self._out.close()
        return code

    def __enter__(self) -> LaunchedPipeline:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


def terminate(proc: subprocess.Popen, timeout: float = 20.0) -> int:
    """SIGTERM (a graceful stop), then SIGKILL after `timeout`; returns the exit code."""
    import signal

    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(10)
    return proc.returncode


def pid_alive(pid: int) -> bool:
    import os

    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    # a zombie still "exists": treat it as gone
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split(") ", 1)[1][0] != "Z"
    except (FileNotFoundError, ProcessLookupError, IndexError):  # it exited mid-read
        return False


class ThreadRunner:
    """Runs a router and members in threads of this process (component tests: real
    sockets, no launcher); `close()` stops members first (they ack and leave), then
    the router, and fails if a thread does not end."""

    def __init__(self) -> None:
        self.stops: list[tuple[Callable[[], Any], Any]] = []

    def router(self, cfg):
        import threading

        from nexus.router.server import Router

        router = Router(cfg)
        thread = threading.Thread(target=router.run, daemon=True)
        thread.start()
        self.stops.append((router.stop_event.set, thread))
        return router

    def member(self, cfg, group: str, name: str):
        """Start a member of `group`; returns (member, stop, thread)."""
        import asyncio
        import threading

        from nexus.member.runtime import Member

        holder: dict[str, Any] = {}
        ready = threading.Event()

        def run() -> None:
            async def main() -> None:
                member = Member(cfg, group, name)
                holder["member"], holder["loop"] = member, asyncio.get_running_loop()
                ready.set()
                await member.run()

            asyncio.run(main())

        thread = threading.Thread(target=run, daemon=True)
        thread.start()
        if not ready.wait(10):
            raise TimeoutError(f"member {name} did not start within 10s")

        def stop() -> None:
            holder["loop"].call_soon_threadsafe(holder["member"].stop_event.set)

        self.stops.append((stop, thread))
        return holder["member"], stop, thread

    def close(self) -> None:
        for stop, thread in reversed(self.stops):
            if thread.is_alive():
                try:
                    stop()
                except RuntimeError:  # its loop already closed
                    pass
                thread.join(15)
                if thread.is_alive():
                    raise AssertionError("component thread did not stop")
