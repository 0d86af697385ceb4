"""`python -m nexus.launch`: start, watch and restart the whole process group.

The supervisor loop only waits on child sentinels and the control socket; signal
handlers set a flag. Stop order is the HTTP port (it only reports), then producers,
then workers (they finish and ack in-flight events while the router is still there),
then the router (flush, fsync, cursors). Children die with the launcher (PR_SET_PDEATHSIG), so none is orphaned;
what a child forks lives in the child's process group and is killed when the child
ends; what escapes the group (setsid) is re-parented to the launcher (a child
subreaper) once its parent died, and ended then.

Before it touches anything the launcher locks the data dir (nexus/common/datalock.py): a
second pipeline on the same data dir refuses at once. Children get the config the
launcher validated, never the file as it is when they restart. The router and the
members beat their black box; one that stops beating for `hang_timeout` is restarted.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import multiprocessing.connection
import os
import signal
import sys
import time
from multiprocessing.process import BaseProcess

import msgspec
import structlog
import zmq

from nexus import config as config_mod
from nexus.common import blackbox, logs, private, process, redact
from nexus.common.backoff import backoff_delay
from nexus.common.datalock import LAUNCHER_LOCK, ROUTER_LOCK, DataDirLock, clean_stale_run
from nexus.common.statefile import unlink_quietly
from nexus.errors import ConfigError, ExitCode, NexusError, describe_exit
from nexus.gateway import listen as gateway_listen
from nexus.http import credential as http_credential
from nexus.http import listen as http_listen
from nexus.protocol import curve, transport
from nexus.protocol.client import CoordClient
from nexus.protocol.gatekeeper import Gatekeeper, KeyRing
from nexus.protocol.wire import ControlReply, control_decoder
from nexus.supervisor.autoscaler import Autoscaler
from nexus.supervisor.child import entry
from nexus.supervisor.children import KILL_GRACE, Child, ChildState, end_orphans
from nexus.supervisor.crashes import CrashBook
from nexus.supervisor.natsserver import EmbeddedServer
from nexus.supervisor.reloader import Reloader

log = structlog.get_logger("nexus.launch")
# the gateway with the producers: it stops taking requests and settles what is in flight
# while the router still answers
ROLES_STOP_ORDER = ("http", "gateway", "producer", "worker", "router")
READY_CHECK_EVERY = 0.5  # seconds between the readiness probes (a status request each) until ready
AUTOSCALE_ASK_TIMEOUT = 0.25  # seconds: the autoscaler's status request (skipped tick when late)
FAST_RECYCLE = 1.0  # seconds: a member recycling sooner than this after its spawn restarts after a backoff


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
        self.failed_groups: dict[str, str] = {}  # group -> why its first member was given up on
        self.ready_check_at = 0.0  # monotonic time of the next readiness probe
        self.starting = True  # until the router answers; then producers and workers start
        self.reload_requested = False
        self.scale: dict[str, int] = {g: w.initial_processes() for g, w in cfg.workers.items()}
        self.autoscaler = Autoscaler(cfg.workers)  # on a reload: self.autoscaler.configure(workers)
        self.token = f"{os.getpid()}-{time.time_ns()}"  # marks every process of this run
        self.lock: DataDirLock | None = None
        self.crashbook = CrashBook(cfg)
        self.control: zmq.Socket | None = None
        self.gatekeeper: Gatekeeper | None = None  # CURVE on a tcp:// control endpoint
        self.curve: curve.ClientKeys | None = None  # the launcher's own requests to the router
        self.reloader = Reloader(self)  # `nexus reload`, SIGHUP: applied over the loop's ticks
        # engine nats with embedded_server: a nats-server of our own, up before the router
        self.nats = EmbeddedServer(cfg) if cfg.engine == "nats" and cfg.nats.embedded_server else None

    # -- before anything runs --------------------------------------------------------
    def prepare(self) -> zmq.Socket:
        """Lock the data dir, clean up after a killed run, bind control (returned).
        Raises ConfigError (exit 3) with one line when the data dir or a port is taken."""
        cfg = self.cfg
        # refused before anything is touched, one line, exit 3: a data dir others can
        # write, or a TCP bind other hosts can reach without CURVE (fail closed)
        private.check_data_dir(cfg.data_dir, cfg.security.ipc_group)
        curve.check_binds(cfg, curve.server_endpoints(cfg))
        if cfg.http.listen:
            http_listen.check(cfg.http)  # malformed, taken, or off loopback without a token
        if cfg.gateway.listen:
            gateway_listen.check(cfg)  # malformed, taken, bad TLS files, or off loopback without TLS
        keys = curve.server_keys(cfg)
        # the launcher's requests use the children's keys: a bad file is one line here, not in each child
        self.curve = curve.client_keys(cfg)
        self.lock = DataDirLock(cfg.data_dir, LAUNCHER_LOCK, "pipeline").acquire(self.token)
        if self.nats is not None:
            self.nats.check()  # the binary, the port: one line before anything starts
        previous = self.lock.previous.split()
        # the router lock too, while cleaning: no router may be running on this data dir
        with DataDirLock(cfg.data_dir, ROUTER_LOCK, "router"):
            clean_stale_run(
                cfg.data_dir,
                [cfg.ingest, cfg.confirm, cfg.publish, cfg.coord, cfg.control_endpoint],
                previous[1] if len(previous) > 1 else "",
            )
            private.tighten(cfg.data_dir, cfg.security.ipc_group)  # what an older version left readable
        if cfg.http.listen:
            http_credential.prepare(cfg)  # the HTTP port's token (made once when http.token is unset)
        process.become_subreaper()
        os.environ[process.RUN_ENV] = self.token  # inherited by every child and its forks
        for name, value in process.MALLOC_ENV.items():  # read by each child's libc at its start
            os.environ.setdefault(name, value)
        ctx: zmq.Context = zmq.Context.instance()
        if keys is not None and cfg.control_endpoint.startswith("tcp://"):
            self.gatekeeper = Gatekeeper(ctx, KeyRing(curve.authorized_keys_dir(cfg), keys.pair)).start()
        try:
            self.control = transport.bind(ctx, zmq.ROUTER, cfg.control_endpoint, linger_ms=0, curve=keys)
        except zmq.ZMQError as exc:
            raise ConfigError(f"cannot bind control endpoint {cfg.control_endpoint}: {exc}") from None
        if self.gatekeeper is not None:
            self.gatekeeper.watch(self.control)
        return self.control

    def release(self) -> None:
        if self.control is not None:
            if self.gatekeeper is not None:
                self.gatekeeper.forget(self.control)
            self.control.close(0)
            self.control = None
        if self.gatekeeper is not None:
            self.gatekeeper.stop()
            self.gatekeeper = None
        if self.lock is not None:
            self.lock.release()
            self.lock = None

    # -- children ------------------------------------------------------------------
    def _spawn(self, child: Child) -> None:
        if child.box is None:
            child.box = self._new_box(child)
        else:
            child.box.reset()
        # a router restarted under live members lets them rejoin with their partitions first
        members_alive = child.role == "router" and any(c.role == "worker" and c.alive() for c in self.children.values())
        blackbox.take_reason(self.cfg.data_dir, child.name)  # a stale one from an earlier run
        cfg = self.cfg
        if child.role == "router":  # during a reload: the staged view the router is meant to hold
            cfg = self.reloader.router_start_config() or cfg
        child.process = proc = self.mp.Process(
            target=entry,
            name=child.name,
            daemon=False,
            args=(child.role, cfg, self.env, child.name, child.group, os.getpid(), members_alive),
        )
        proc.start()
        child.state = ChildState.RUNNING
        child.started = time.time()
        child.spawned = time.monotonic()
        child.kill_at = 0.0
        child.first_beat = 0.0
        child.reaped = False
        log.info("process_started", name=child.name, role=child.role, pid=child.pid)

    def _new_box(self, child: Child) -> blackbox.BlackBox:
        # a slot per concurrent handler call: with fewer, calls would share one and mix up events
        spec = self.cfg.workers.get(child.group) if child.role == "worker" else None
        slots = max(blackbox.DEFAULT_SLOTS, spec.concurrency if spec is not None else 0)
        return blackbox.BlackBox.create(blackbox.path_for(self.cfg.data_dir, child.name), slots)

    @staticmethod
    def _drop_box(child: Child) -> None:
        """The child ended for good (scaled away, shutdown): unmap and delete its box."""
        if child.box is not None:
            child.box.close()
            unlink_quietly(child.box.path)
            child.box = None

    def _add(self, name: str, role: str, group: str = "") -> Child:
        child = self.children.get(name) or Child(name, role, group)
        child.retired = False
        self.children[name] = child
        self._spawn(child)
        return child

    def _router_answers(self, timeout: float) -> bool:
        """The router answers status and has read its journal (while it recovers it
        answers too, marked `recovering`)."""
        status = self.router_status(timeout)
        return status is not None and not status.get("router", {}).get("recovering")

    def _start_rest(self) -> None:
        """The router answers: start producers and workers. Until then the router may
        recover a journal of any size; it beats meanwhile, and only its exit or a
        silence of hang_timeout fails the start (no fixed deadline)."""
        self.starting = False
        if self.cfg.gateway.listen:
            self._add("gateway", "gateway")  # a producer: up once the router answers
        for name in self.cfg.producers:
            self._add(name, "producer")
        for group, n in self.scale.items():
            for i in range(n):
                self._add(f"{group}-{i}", "worker", group)

    def set_scale(self, group: str, n: int, manual: bool = True) -> dict:
        if group not in self.cfg.workers:
            return {"ok": False, "error": f"unknown group {group!r}"}
        if not 0 <= n <= 256:
            return {"ok": False, "error": "N must be between 0 and 256"}
        if manual and (refused := self.autoscaler.manual(group, n, time.monotonic())):
            return {"ok": False, "error": refused}  # (within the bounds: the cooldown restarts)
        old = self.scale[group]
        self.scale[group] = n
        self.failed_groups.pop(group, None)  # failed members start again: a new chance
        if self.starting:
            return {"ok": True, "group": group, "old": old, "new": n}
        for i in range(n):
            child = self.children.get(f"{group}-{i}")
            if child is not None and child.retired and _running(child) is not None:
                continue  # still draining after a scale-down: started again once it has exited
            if child is None or child.retired or child.state in (ChildState.STOPPED, ChildState.FAILED):
                self._add(f"{group}-{i}", "worker", group)
        for child in self.children.values():
            if child.group == group and child.role == "worker" and _index(child) >= n:
                if not child.retired:
                    child.retired = True
                    self._terminate(child)
        log.info("group_scaled", group=group, old=old, new=n)
        return {"ok": True, "group": group, "old": old, "new": n}

    def _terminate(self, child: Child) -> None:
        if (proc := _running(child)) is not None:
            child.state = ChildState.STOPPING
            proc.terminate()
        else:
            child.state = ChildState.STOPPED

    def _reaped(self, child: Child) -> None:
        if child.end_group():
            end_orphans(self.children.values(), keep=self._own_servers())

    def _own_servers(self) -> set[int]:
        """Direct children that are no orphans though no `Child`: the embedded nats-server."""
        return {self.nats.pid} if self.nats is not None and self.nats.pid else set()

    def _on_exit(self, child: Child) -> None:
        code = _exit_code(child)
        if code is None:
            return  # still running (the loop calls this once it has exited)
        hung = child.state == ChildState.HUNG
        child.last_exit = f"hung ({describe_exit(code)})" if hung else describe_exit(code)
        reason = blackbox.take_reason(self.cfg.data_dir, child.name) if code == ExitCode.CONFIG else ""
        if reason:
            child.last_exit = f"config error: {reason}"
        if self.stopping or child.retired or child.state == ChildState.STOPPING:
            child.state = ChildState.STOPPED
            log.info("process_stopped", name=child.name, exit_code=code)
            if child.retired:
                self._drop_box(child)
                if not self.stopping and child.role == "worker" and _index(child) < self.scale.get(child.group, 0):
                    self._add(child.name, "worker", child.group)  # scaled up again while it drained
            return
        if child.role == "router" and self.starting:
            cls = ConfigError if code == ExitCode.CONFIG else NexusError
            raise cls(
                f"router exited during start ({child.last_exit})"
                if reason
                else f"router exited during start ({child.last_exit}); see its log above"
            )
        now = time.monotonic()
        if code == ExitCode.RECYCLE and child.role == "worker":
            # drained and ended itself on purpose (max_rss / max_events): not a crash; one
            # that does so right after its start waits restart_backoff[0] (no tight loop)
            child.last_exit = "recycled"
            uptime = now - child.spawned
            if uptime >= FAST_RECYCLE:
                child.restarts += 1
                log.info("process_recycled", name=child.name)
                self._spawn(child)
            else:
                delay = backoff_delay(self.cfg.restart_backoff, 1)
                child.state, child.restart_at = ChildState.BACKOFF, now + delay
                log.warning(
                    "process_recycled",
                    name=child.name,
                    uptime=round(uptime, 2),
                    restart_in=delay,
                    reason="recycled right after its start",
                )
            return
        # a member exit the black box explains counts per event (crashes.py), not as a crash loop
        explained = False
        if child.role == "worker":
            router = self.children.get("router")
            explained = self.crashbook.on_exit(
                child.group,
                child.name,
                child.pid,
                code,
                child.box,
                hung=hung,
                tell=router is not None and router.state == ChildState.RUNNING,
            )
            if not reason:
                child.last_exit = self.crashbook.last_exit.get(child.name, child.last_exit)
        child.crashes = [t for t in child.crashes if now - t < self.cfg.crash_window] + ([] if explained else [now])
        if code == ExitCode.CONFIG:
            child.state = ChildState.FAILED
            self._failed(child, reason or "configuration error (see the line above)")
        elif len(child.crashes) > self.cfg.crash_loop:
            child.state = ChildState.FAILED
            log.error(
                "crash_loop",
                name=child.name,
                crashes=len(child.crashes),
                window=self.cfg.crash_window,
                reason="giving up; fix the cause and restart",
            )
            if child.role == "worker":
                self._failed(child, f"crash loop ({child.last_exit})", logged=True)
        else:
            delay = backoff_delay(self.cfg.restart_backoff, len(child.crashes))
            child.state = ChildState.BACKOFF
            child.restart_at = now + delay
            log.warning("process_crashed", name=child.name, exit_code=code, last_exit=child.last_exit, restart_in=delay)
        if child.role == "router" and child.state == ChildState.FAILED:
            self.exit_code = ExitCode.CRASH_LOOP if code != ExitCode.CONFIG else ExitCode.CONFIG
            self.stopping = True

    def _failed(self, child: Child, reason: str, logged: bool = False) -> None:
        """A child given up on: logged once with its reason; the first member of a group
        to fail logs the group (the pipeline is then not ready, and never claims it)."""
        if child.role == "worker" and child.group not in self.failed_groups:
            self.failed_groups[child.group] = reason
            log.error(
                "group_failed",
                group=child.group,
                member=child.name,
                exit_code=_exit_code(child),
                reason=reason,
                action="not restarting; fix the cause, then restart or `nexus scale`",
            )
        elif not logged:
            same = child.role == "worker" and self.failed_groups.get(child.group) == reason
            log.error(
                "process_failed",
                name=child.name,
                exit_code=_exit_code(child),
                reason="as above" if same else reason,
            )

    def _watch(self, now: float) -> None:
        """Hang detection: a router or member whose box beat is older than hang_timeout
        gets SIGTERM, then SIGKILL after KILL_GRACE; its exit restarts it as a crash."""
        timeout = self.cfg.hang_timeout
        for child in self.children.values():
            if child.state == ChildState.HUNG:
                if child.kill_at and now >= child.kill_at and (proc := _running(child)) is not None:
                    log.warning("process_killed", name=child.name, reason="hung")
                    proc.kill()
                    child.kill_at = 0.0
                continue
            if child.state != ChildState.RUNNING:
                continue
            silence = child.silent(now, timeout)
            if silence is None:
                continue
            log.error("process_hung", name=child.name, pid=child.pid, silence=round(silence, 1))
            if child.role == "router" and self.starting:
                raise NexusError(
                    f"router stopped beating for {silence:.0f}s during start (hang_timeout "
                    f"{timeout:g}s); see its log above"
                )
            child.state = ChildState.HUNG
            child.kill_at = now + KILL_GRACE
            if (proc := _running(child)) is not None:
                proc.terminate()

    # -- supervision loop ----------------------------------------------------------------
    def run(self) -> int:
        def on_signal(signum, frame):  # noqa: ARG001
            self.stopping = True

        signal.signal(signal.SIGTERM, on_signal)
        signal.signal(signal.SIGINT, on_signal)
        signal.signal(signal.SIGHUP, lambda *_: setattr(self, "reload_requested", True))
        try:
            control = self.control if self.control is not None else self.prepare()
            if self.nats is not None:
                self.nats.start()
                self.nats.wait_listening()
            self._add("router", "router")
            if self.cfg.http.listen:
                self._add("http", "http")  # up from the start: it reports the router's start too
            poller = zmq.Poller()
            poller.register(control, zmq.POLLIN)
            while not self.stopping:
                sentinels = {
                    c.process.sentinel: (c, c.process)
                    for c in self.children.values()
                    if c.state in (ChildState.RUNNING, ChildState.STOPPING, ChildState.HUNG) and c.process is not None
                }
                for fd in sentinels:
                    poller.register(fd, zmq.POLLIN)
                events = dict(poller.poll(100))
                for fd, (child, proc) in sentinels.items():
                    poller.unregister(fd)
                    if fd in events or not proc.is_alive():
                        self._reaped(child)
                        if proc.exitcode is not None:
                            self._on_exit(child)
                if control in events:
                    self._on_control(control)
                if self.gatekeeper is not None and self.gatekeeper.tick(time.monotonic()):
                    control = self._reopen_control(poller, control)
                if self.reload_requested and not self.starting:
                    self.reload_requested = False
                    self.reload()  # SIGHUP: like `nexus reload`
                now = time.monotonic()
                if self.nats is not None:
                    self.nats.tick(now)
                self._watch(now)
                self.reloader.tick(now)  # a reload under way: drains, rolling restarts
                for child in self.children.values():
                    if child.state == ChildState.BACKOFF and now >= child.restart_at and not self.stopping:
                        child.restarts += 1
                        self._spawn(child)
                if self.starting:
                    router_up = self.children["router"].state == ChildState.RUNNING
                    if not self.stopping and router_up and self._router_answers(0.1):
                        self._start_rest()
                else:
                    self._log_ready()
                    self._autoscale()
        except NexusError as exc:
            log.error("launch_failed", error=str(exc))
            self.exit_code = exc.exit_code if self.exit_code == ExitCode.OK else self.exit_code
        finally:
            self.shutdown()
            self.release()
        return int(self.exit_code)

    def _log_ready(self) -> None:
        # (a blocking request in the supervision loop: probed every READY_CHECK_EVERY, briefly)
        now = time.monotonic()
        if self.ready_logged or now < self.ready_check_at:
            return
        self.ready_check_at = now + READY_CHECK_EVERY
        # members given up on (failed) will not join: not waited for; but a group with
        # members wanted and none left can never have its partitions assigned: not ready
        # (no request needed to know that)
        live = {
            group: sum(
                1
                for c in self.children.values()
                if c.role == "worker" and c.group == group and not c.retired and c.state != ChildState.FAILED
            )
            for group in self.scale
        }
        if any(n > 0 and live[group] == 0 for group, n in self.scale.items()):
            return
        status = self.router_status(0.1)
        if status is None or status.get("router", {}).get("recovering"):
            return  # still reading its journal: not ready, even with no members
        for group, n in live.items():
            if len(status["groups"].get(group, {}).get("members", [])) < n:
                return
        self.ready_logged = True
        log.info("pipeline_ready", seconds=round(time.time() - self.started, 3), processes=len(self.children))

    def _autoscale(self) -> None:
        """A tick of the autoscaler (nexus/supervisor/autoscaler.py): at most once a
        second and only with an autoscaled group, one short status request; no answer or
        a recovering router skips the tick. Each decision is logged, then applied."""
        now = time.monotonic()
        if self.stopping or not self.autoscaler.due(now):
            return
        status = self.router_status(AUTOSCALE_ASK_TIMEOUT)
        if status is None or status.get("router", {}).get("recovering"):
            return
        for d in self.autoscaler.observe(now, status.get("groups", {}), self.scale, self.failed_groups):
            log.info(
                "autoscale",
                group=d.group,
                **{"from": d.current},
                to=d.desired,
                lag=d.lag,
                lag_per_member=d.lag_per_member,
                reason=d.reason,
            )
            self.set_scale(d.group, d.desired, manual=False)

    def _running_members(self) -> dict[str, int]:
        """Member processes running now, per group (the autoscale status's `members`)."""
        running = dict.fromkeys(self.scale, 0)
        for c in self.children.values():
            if c.role == "worker" and c.state == ChildState.RUNNING and not c.retired and c.group in running:
                running[c.group] += 1
        return running

    def router_status(self, timeout: float) -> dict | None:
        """The router's status; None when it does not answer (or refuses)."""
        try:
            return CoordClient(self.cfg.coord, timeout, curve=self.curve).status()
        except NexusError:
            return None

    def reload(self, dry_run: bool = False) -> dict:
        """Validate the file as it is now and apply what changed live (see
        nexus/supervisor/reloader.py); a bad file is refused with one line and nothing
        changes. `dry_run`: only say what would change."""
        return self.reloader.reload(dry_run)

    # what the reloader uses besides the launcher's state (its `Launcher` protocol)
    def spawn(self, child: Child) -> None:
        self._spawn(child)

    def terminate(self, child: Child) -> None:
        self._terminate(child)

    def add_child(self, name: str, role: str, group: str = "") -> Child:
        return self._add(name, role, group)

    def _reopen_control(self, poller: zmq.Poller, control: zmq.Socket) -> zmq.Socket:
        """Keys were revoked: close control and bind it again, which ends every
        connection (see Router._reopen_keyed); the CLI connects per request anyway."""
        assert self.gatekeeper is not None
        poller.unregister(control)
        self.gatekeeper.forget(control)
        control.close(0)
        self.control = control = transport.bind(
            zmq.Context.instance(),
            zmq.ROUTER,
            self.cfg.control_endpoint,
            linger_ms=0,
            curve=curve.server_keys(self.cfg),
        )
        self.gatekeeper.watch(control)
        poller.register(control, zmq.POLLIN)
        return control

    def _on_control(self, control: zmq.Socket) -> None:
        keyed = self.gatekeeper is not None
        while control.poll(0):
            parts = control.recv_multipart(copy=False)  # (a frame has the key's User-Id)
            frames = [f.bytes for f in parts]
            if len(frames) != 2:
                continue
            reply: ControlReply
            try:
                req = control_decoder.decode(frames[1])
                grant = self.gatekeeper.grant(parts[-1]) if self.gatekeeper is not None else None
                if keyed and req.cmd != "status" and (grant is None or not grant.admin):
                    assert self.gatekeeper is not None
                    self.gatekeeper.forbidden["admin"] += 1
                    who = (
                        f"{grant.name} is a {grant.role} key"
                        if grant is not None
                        else "this key is no longer authorized"
                    )
                    reply = {"ok": False, "error": f"forbidden: {req.cmd} needs an admin key; {who}"}
                elif req.cmd == "status":
                    reply = {
                        "ok": True,
                        "processes": self.describe(),
                        "ready": self.ready_logged,
                        "scale": dict(self.scale),
                        "autoscale": self.autoscaler.status(time.monotonic(), time.time(), self._running_members()),
                        "launcher": {
                            "pid": os.getpid(),
                            "uptime": round(time.time() - self.started, 1),
                            "config": self.cfg.source,
                        },
                    }
                    if (reload := self.reloader.status()) is not None:
                        reply["reload"] = reload
                elif req.cmd == "scale":
                    reply = self.set_scale(req.group, req.n)
                    if reply["ok"] and (auto := self.cfg.workers[req.group].autoscale) is not None:
                        reply["autoscale"] = {"min": auto.min, "max": auto.max, "cooldown": float(auto.cooldown)}
                elif req.cmd == "reload":
                    reply = self.reload(req.dry_run)
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
        own = [self.nats.describe()] if self.nats is not None else []
        return own + [
            {
                "name": c.name,
                "role": c.role,
                "group": c.group,
                "pid": c.pid,
                "state": c.state,
                "restarts": c.restarts,
                "uptime": round(now - c.started, 1) if c.state == ChildState.RUNNING else 0.0,
                "last_exit": c.last_exit,
                **({"detail": self._detail(c)} if c.role == "producer" else {}),
            }
            for c in self.children.values()
        ]

    def _detail(self, child: Child) -> dict:
        from nexus.sources import status_path

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
                if (proc := _running(child)) is not None:
                    child.state = ChildState.STOPPING
                    proc.terminate()
                elif child.state != ChildState.FAILED:
                    child.state = ChildState.STOPPED
            for child in group:
                if child.process is None:
                    continue
                sentinel = [child.process.sentinel]
                if not multiprocessing.connection.wait(sentinel, max(0.0, deadline - time.monotonic())):
                    log.warning("process_killed", name=child.name, reason="shutdown_timeout")
                    child.process.kill()
                    multiprocessing.connection.wait(sentinel, 2)
                self._reaped(child)
                if child.state != ChildState.FAILED:
                    child.state = ChildState.STOPPED
        end_orphans(self.children.values(), keep=self._own_servers())
        for child in self.children.values():
            self._drop_box(child)
        if self.nats is not None:
            self.nats.stop()  # last: every child that used it has stopped
        log.info("shutdown_complete", exit_code=int(self.exit_code))


def _running(child: Child) -> BaseProcess | None:
    """The child's process while it is alive."""
    proc = child.process
    return proc if proc is not None and proc.is_alive() else None


def _index(child: Child) -> int:
    """A member's number in its group: GROUP-3 -> 3."""
    return int(child.name.rsplit("-", 1)[1])


def _exit_code(child: Child) -> int | None:
    """How the child's process ended (negative: the signal); None while it runs."""
    return child.process.exitcode if child.process is not None else None


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m nexus.launch", description="Run the Nexus process group.")
    parser.add_argument("-c", "--config", help="config file (default: $NEXUS_CONFIG or config/default.yaml)")
    parser.add_argument("--env", help="overlay config/<ENV>.yaml (default: $NEXUS_ENV)")
    args = parser.parse_args(argv)
    private.set_umask()  # first: every file and folder this run makes is private (children inherit it)
    try:
        cfg = config_mod.load(args.config, args.env)
    except ConfigError as exc:
        print(f"nexus: {redact.scrub(str(exc))}", file=sys.stderr)
        return int(exc.exit_code)
    config_mod.add_module_paths(cfg)
    private.use_group(cfg.security.ipc_group)
    logs.configure(cfg.log.level, cfg.log.format, process="launcher")
    launcher = Launcher(cfg, args.env)
    try:
        launcher.prepare()
    except NexusError as exc:
        # the data dir is another pipeline's, or a port is taken: one line, nothing touched
        launcher.release()
        print(f"nexus: {redact.scrub(str(exc))}", file=sys.stderr)
        return int(exc.exit_code)
    return launcher.run()


if __name__ == "__main__":
    sys.exit(main())
