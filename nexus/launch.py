"""`python -m nexus.launch`: start, watch and restart the whole process group.

The supervisor loop only waits on child sentinels and the control socket; signal
handlers set a flag. Stop order is producers, then workers (they finish and ack
in-flight events while the router is still there), then the router (flush, fsync,
cursors). Children die with the launcher (PR_SET_PDEATHSIG), so none is orphaned.
"""
from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import signal
import sys
import time
from dataclasses import dataclass, field

import msgspec
import structlog
import zmq

from . import blackbox, config as config_mod, logs, transport
from .child import entry
from .crashes import CrashBook
from .errors import ConfigError, ExitCode, NexusError
from .wire import StatusRequest, coord_decoder, encoder

log = structlog.get_logger("nexus.launch")
ROLES_STOP_ORDER = ("producer", "worker", "router")


class ControlRequest(msgspec.Struct, frozen=True):
    cmd: str                      # status | scale | stop
    group: str = ""
    n: int = 0


@dataclass
class Child:
    name: str
    role: str
    group: str = ""
    process: multiprocessing.Process | None = None
    state: str = "new"            # starting, running, backoff, stopping, stopped, failed
    restarts: int = 0
    started: float = 0.0
    crashes: list[float] = field(default_factory=list)
    restart_at: float = 0.0
    retired: bool = False         # scaled away: do not restart
    box: blackbox.BlackBox | None = None   # what the child last beat and was handling

    @property
    def pid(self) -> int | None:
        return self.process.pid if self.process is not None else None

    def alive(self) -> bool:
        return self.process is not None and self.process.is_alive()


class Launcher:
    def __init__(self, cfg: config_mod.Config, env: str | None):
        self.cfg = cfg
        self.env = env
        self.mp = multiprocessing.get_context("spawn")
        self.children: dict[str, Child] = {}
        self.stopping = False
        self.exit_code = ExitCode.OK
        self.started = time.time()
        self.ready_logged = False
        self.scale: dict[str, int] = {g: w.processes for g, w in cfg.workers.items()}
        self.crashbook = CrashBook(cfg)

    # -- children ------------------------------------------------------------------
    def _spawn(self, child: Child) -> None:
        if child.box is None:
            child.box = blackbox.BlackBox.create(blackbox.path_for(self.cfg.data_dir, child.name))
        else:
            child.box.reset()
        child.process = self.mp.Process(
            target=entry, name=child.name, daemon=False,
            args=(child.role, self.cfg.source, self.env, child.name, child.group, os.getpid()))
        child.process.start()
        child.state = "running"
        child.started = time.time()
        log.info("process_started", name=child.name, role=child.role, pid=child.pid)

    def _add(self, name: str, role: str, group: str = "") -> Child:
        child = self.children.get(name) or Child(name, role, group)
        child.retired = False
        self.children[name] = child
        self._spawn(child)
        return child

    def _wait_router_ready(self, timeout: float = 15.0) -> None:
        ctx = zmq.Context.instance()
        deadline = time.monotonic() + timeout
        request = encoder.encode(StatusRequest())
        while time.monotonic() < deadline and not self.stopping:
            router = self.children["router"]
            if not router.alive():
                raise NexusError(f"router exited during start (exit code {router.process.exitcode}); see its log above")
            if transport.request(ctx, self.cfg.coord, request, 0.2) is not None:
                return
        if not self.stopping:
            raise NexusError(f"router did not answer on {self.cfg.coord} within {timeout:g}s")

    def start(self) -> None:
        self._add("router", "router")
        self._wait_router_ready()
        for name in self.cfg.producers:
            self._add(name, "producer")
        for group, n in self.scale.items():
            for i in range(n):
                self._add(f"{group}-{i}", "worker", group)

    def set_scale(self, group: str, n: int) -> dict:
        if group not in self.cfg.workers:
            return {"ok": False, "error": f"unknown group {group!r}"}
        if not 0 <= n <= 256:
            return {"ok": False, "error": "N must be between 0 and 256"}
        old = self.scale[group]
        self.scale[group] = n
        for i in range(n):
            child = self.children.get(f"{group}-{i}")
            if child is None or child.retired or child.state in ("stopped", "failed"):
                self._add(f"{group}-{i}", "worker", group)
        for child in self.children.values():
            if child.group == group and child.role == "worker" and int(child.name.rsplit("-", 1)[1]) >= n:
                if not child.retired:
                    child.retired = True
                    self._terminate(child)
        log.info("group_scaled", group=group, old=old, new=n)
        return {"ok": True, "group": group, "old": old, "new": n}

    def _terminate(self, child: Child) -> None:
        if child.alive():
            child.state = "stopping"
            child.process.terminate()
        else:
            child.state = "stopped"

    def _on_exit(self, child: Child) -> None:
        code = child.process.exitcode
        if self.stopping or child.retired or child.state == "stopping":
            child.state = "stopped"
            log.info("process_stopped", name=child.name, exit_code=code)
            return
        if code == ExitCode.RECYCLE and child.role == "worker":     # drained on purpose: restart now
            log.info("process_recycled", name=child.name)
            child.restarts += 1
            return self._spawn(child)
        now = time.monotonic()
        # a member exit the black box explains counts per event (crashes.py), not as a crash loop
        explained = child.role == "worker" and self.crashbook.on_exit(child.group, child.name, child.pid,
                                                                      code, child.box)
        child.crashes = [t for t in child.crashes if now - t < self.cfg.crash_window] + ([] if explained else [now])
        if code == ExitCode.CONFIG:
            child.state = "failed"
            log.error("process_failed", name=child.name, exit_code=code,
                      reason="configuration error (see the line above); not restarting")
        elif len(child.crashes) > self.cfg.crash_loop:
            child.state = "failed"
            log.error("crash_loop", name=child.name, crashes=len(child.crashes),
                      window=self.cfg.crash_window, reason="giving up; fix the cause and restart")
        else:
            backoff = self.cfg.restart_backoff
            delay = backoff[min(max(len(child.crashes) - 1, 0), len(backoff) - 1)] if backoff else 1.0
            child.state = "backoff"
            child.restart_at = now + delay
            log.warning("process_crashed", name=child.name, exit_code=code, restart_in=delay)
        if child.role == "router" and child.state == "failed":
            self.exit_code = ExitCode.CRASH_LOOP if code != ExitCode.CONFIG else ExitCode.CONFIG
            self.stopping = True

    # -- supervision loop ----------------------------------------------------------------
    def run(self) -> int:
        def on_signal(signum, frame):  # noqa: ARG001
            self.stopping = True

        signal.signal(signal.SIGTERM, on_signal)
        signal.signal(signal.SIGINT, on_signal)
        ctx = zmq.Context.instance()
        control = transport.bind(ctx, zmq.ROUTER, self.cfg.control_endpoint, linger_ms=0)
        try:
            self.start()
            poller = zmq.Poller()
            poller.register(control, zmq.POLLIN)
            while not self.stopping:
                sentinels = {c.process.sentinel: c for c in self.children.values()
                             if c.state in ("running", "stopping") and c.process is not None}
                for fd in sentinels:
                    poller.register(fd, zmq.POLLIN)
                events = dict(poller.poll(100))
                for fd, child in sentinels.items():
                    poller.unregister(fd)
                    if fd in events or not child.process.is_alive():
                        child.process.join(0.1)
                        if child.process.exitcode is not None:
                            self._on_exit(child)
                if control in events:
                    self._on_control(control)
                now = time.monotonic()
                for child in self.children.values():
                    if child.state == "backoff" and now >= child.restart_at and not self.stopping:
                        child.restarts += 1
                        self._spawn(child)
                self._log_ready()
        except NexusError as exc:
            log.error("launch_failed", error=str(exc))
            self.exit_code = exc.exit_code if self.exit_code == ExitCode.OK else self.exit_code
        finally:
            self.shutdown()
            control.close(0)
        return int(self.exit_code)

    def _log_ready(self) -> None:
        if self.ready_logged:
            return
        status = self.router_status(0.2)
        if status is None:
            return
        for group, n in self.scale.items():
            if len(status["groups"].get(group, {}).get("members", [])) < n:
                return
        self.ready_logged = True
        log.info("pipeline_ready", seconds=round(time.time() - self.started, 3),
                 processes=len(self.children))

    def router_status(self, timeout: float) -> dict | None:
        raw = transport.request(zmq.Context.instance(), self.cfg.coord, encoder.encode(StatusRequest()), timeout)
        if raw is None:
            return None
        msg = coord_decoder.decode(raw)
        return getattr(msg, "data", None)

    def _on_control(self, control: zmq.Socket) -> None:
        while control.poll(0):
            frames = control.recv_multipart()
            if len(frames) != 2:
                continue
            try:
                req = msgspec.msgpack.decode(frames[1], type=ControlRequest)
                if req.cmd == "status":
                    reply = {"ok": True, "processes": self.describe(), "ready": self.ready_logged,
                             "launcher": {"pid": os.getpid(), "uptime": round(time.time() - self.started, 1),
                                          "config": self.cfg.source}}
                elif req.cmd == "scale":
                    reply = self.set_scale(req.group, req.n)
                elif req.cmd == "stop":
                    self.stopping = True
                    reply = {"ok": True}
                else:
                    reply = {"ok": False, "error": f"unknown command {req.cmd!r}"}
            except msgspec.MsgspecError as exc:
                reply = {"ok": False, "error": f"bad request: {exc}"}
            control.send_multipart((frames[0], msgspec.msgpack.encode(reply)))

    def describe(self) -> list[dict]:
        now = time.time()
        return [{"name": c.name, "role": c.role, "group": c.group, "pid": c.pid, "state": c.state,
                 "restarts": c.restarts, "uptime": round(now - c.started, 1) if c.state == "running" else 0.0,
                 **({"detail": self._detail(c)} if c.role == "producer" else {}),
                 **({"last_exit": self.crashbook.last_exit[c.name]} if c.name in self.crashbook.last_exit else {})}
                for c in self.children.values()]

    def _detail(self, child: Child) -> dict:
        from .producers import status_path
        try:
            with open(status_path(self.cfg, child.name)) as f:
                return json.load(f)
        except (OSError, ValueError):
            return {}

    def shutdown(self) -> None:
        """Stop in order; whatever is left after shutdown_timeout is killed."""
        deadline = time.monotonic() + self.cfg.shutdown_timeout
        log.info("shutdown_started", timeout=self.cfg.shutdown_timeout)
        for role in ROLES_STOP_ORDER:
            group = [c for c in self.children.values() if c.role == role]
            for child in group:
                if child.alive():
                    child.state = "stopping"
                    child.process.terminate()
                elif child.state != "failed":
                    child.state = "stopped"
            for child in group:
                if child.process is not None:
                    child.process.join(max(0.0, deadline - time.monotonic()))
                    if child.process.is_alive():
                        log.warning("process_killed", name=child.name, reason="shutdown_timeout")
                        child.process.kill()
                        child.process.join(2)
                    if child.state != "failed":
                        child.state = "stopped"
        log.info("shutdown_complete", exit_code=int(self.exit_code))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m nexus.launch", description="Run the Nexus process group.")
    parser.add_argument("-c", "--config", help="config file (default: $NEXUS_CONFIG or config/default.yaml)")
    parser.add_argument("--env", help="overlay config/<ENV>.yaml (default: $NEXUS_ENV)")
    args = parser.parse_args(argv)
    try:
        cfg = config_mod.load(args.config, args.env)
    except ConfigError as exc:
        print(f"nexus: {exc}", file=sys.stderr)
        return int(exc.exit_code)
    logs.configure(cfg.log.level, cfg.log.format, process="launcher")
    try:
        return Launcher(cfg, args.env).run()
    except zmq.ZMQError as exc:
        print(f"nexus: cannot bind control endpoint {cfg.control_endpoint}: {exc}", file=sys.stderr)
        return int(ExitCode.FAILURE)


if __name__ == "__main__":
    sys.exit(main())
