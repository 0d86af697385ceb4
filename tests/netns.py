"""Throwaway network namespaces for multi-host tests: real veth links, a real bridge.

    with Lab(["router", "members"], logdir=tmp_path) as lab:
        lab.address("router")                         # "10.77.0.1"
        p = lab.popen("router", [sys.executable, "-m", "nexus.launch", ...], log)
        lab.link_down("members"); lab.link_up("members")
        lab.impair(["members"], delay=0.05, loss=0.01); lab.clear(["members"])

Each host is a namespace `<prefix>-<host>` with `lo` and `eth0` (10.77.0.N/24); the
other end of every eth0 is a port of a bridge in one more namespace, the switch, so no
interface or address is ever made in the machine's own namespace. `close()` kills what
runs in the namespaces and deletes them, and a new Lab first deletes the namespaces of
an earlier run whose process is gone (a crashed or killed pytest). Needs root (or
CAP_NET_ADMIN and CAP_SYS_ADMIN) and iproute2; `unavailable()` says why it cannot run.
"""

from __future__ import annotations

import functools
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import IO

from nexus.testing import pid_alive, terminate, wait_for

PREFIX = "nxt"  # every namespace a Lab makes is "nxt<pid>-<host>"
SUBNET = "10.77.0"
IP = shutil.which("ip") or "/usr/sbin/ip"
TC = shutil.which("tc") or "/usr/sbin/tc"
LINKEM = str(Path(__file__).parent / "support" / "linkem.py")


def _run(*argv: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    result = subprocess.run(argv, capture_output=True, text=True, timeout=30)
    if check and result.returncode != 0:
        raise RuntimeError(f"{' '.join(argv)}: {result.stderr.strip() or result.returncode}")
    return result


def _namespaces() -> list[str]:
    out = _run(IP, "netns", "list", check=False).stdout
    return [line.split()[0] for line in out.splitlines() if line.strip()]


def _kill_inside(ns: str) -> None:
    """SIGKILL every process still running in namespace `ns` (only ours live there)."""
    for pid in _run(IP, "netns", "pids", ns, check=False).stdout.split():
        try:
            os.kill(int(pid), signal.SIGKILL)
        except (ProcessLookupError, ValueError):
            pass


def _delete(ns: str) -> None:
    _kill_inside(ns)
    _run(IP, "netns", "delete", ns, check=False)


def remove_leftovers() -> list[str]:
    """Delete the namespaces of earlier Labs whose process has exited; returns them."""
    gone = []
    for ns in _namespaces():
        owner = ns[len(PREFIX) :].split("-", 1)[0]
        if ns.startswith(PREFIX) and owner.isdigit() and not pid_alive(int(owner)):
            _delete(ns)
            gone.append(ns)
    return gone


@functools.cache
def unavailable() -> str | None:
    """Why namespaces cannot be made here (a skip reason), or None when they can."""
    if not (os.path.exists(IP) and os.access(IP, os.X_OK)):
        return "iproute2's `ip` is not installed"
    if os.geteuid() != 0:
        return "network namespaces need root (ip netns add), and this run is not root"
    probe = f"{PREFIX}{os.getpid()}-probe"
    try:
        _run(IP, "netns", "add", probe)
        _run(IP, "-n", probe, "link", "add", "p0", "type", "veth", "peer", "name", "p1")
        _run(IP, "-n", probe, "link", "add", "br0", "type", "bridge")
        return None
    except (RuntimeError, OSError, subprocess.SubprocessError) as exc:
        return f"cannot create network namespaces with veth and bridge here: {exc}"
    finally:
        _delete(probe)


@functools.cache
def netem_unavailable() -> str | None:
    """Why `tc qdisc ... netem` cannot be used here, or None."""
    if not (os.path.exists(TC) and os.access(TC, os.X_OK)):
        return "iproute2's `tc` is not installed"
    probe = f"{PREFIX}{os.getpid()}-netem"
    try:
        _run(IP, "netns", "add", probe)
        _run(IP, "-n", probe, "link", "add", "p0", "type", "veth", "peer", "name", "p1")
        result = _run(TC, "-n", probe, "qdisc", "add", "dev", "p0", "root", "netem", "delay", "1ms", check=False)
        if result.returncode != 0:
            return f"tc netem does not work in this kernel (sch_netem missing?): {result.stderr.strip()}"
        return None
    except (RuntimeError, OSError, subprocess.SubprocessError) as exc:
        return f"cannot probe tc netem: {exc}"
    finally:
        _delete(probe)


class Lab:
    """Hosts (namespaces) on one switch (a bridge in its own namespace)."""

    def __init__(self, hosts: Sequence[str], logdir: Path):
        self.logdir = logdir  # the output of the helpers the lab runs itself (linkem)
        self.relays: dict[str, subprocess.Popen[bytes]] = {}
        self.tag = f"{PREFIX}{os.getpid()}"
        self.hosts = list(hosts)
        self.switch = f"{self.tag}-switch"
        self.made: list[str] = []
        self.procs: list[tuple[subprocess.Popen[bytes], IO[bytes]]] = []

    def ns(self, host: str) -> str:
        return f"{self.tag}-{host}"

    def address(self, host: str) -> str:
        return f"{SUBNET}.{self.hosts.index(host) + 1}"

    def _port(self, host: str) -> str:
        return f"p{self.hosts.index(host) + 1}"  # the switch's port for `host`

    def start(self) -> Lab:
        remove_leftovers()
        existing = _namespaces()
        for ns in [self.ns(h) for h in self.hosts] + [self.switch]:
            if ns in existing:  # this pid's own earlier Lab that was not closed
                _delete(ns)
        try:
            self._add(self.switch)
            _run(IP, "-n", self.switch, "link", "add", "br0", "type", "bridge")
            _run(IP, "-n", self.switch, "link", "set", "br0", "up")
            for host in self.hosts:
                ns, port = self.ns(host), self._port(host)
                self._add(ns)
                _run(IP, "-n", self.switch, "link", "add", port, "type", "veth", "peer", "name", "eth0", "netns", ns)
                _run(IP, "-n", self.switch, "link", "set", port, "master", "br0", "up")
                _run(IP, "-n", ns, "addr", "add", f"{self.address(host)}/24", "dev", "eth0")
                _run(IP, "-n", ns, "link", "set", "eth0", "up")
                _run(IP, "-n", ns, "link", "set", "lo", "up")
        except BaseException:
            self.close()
            raise
        return self

    def _add(self, ns: str) -> None:
        self.made.append(ns)  # before: a half-made namespace is deleted too
        _run(IP, "netns", "add", ns)

    # -- processes ---------------------------------------------------------------------
    def command(self, host: str, argv: Sequence[str]) -> list[str]:
        return [IP, "netns", "exec", self.ns(host), *argv]

    def popen(self, host: str, argv: Sequence[str], log: Path, env: dict | None = None) -> subprocess.Popen[bytes]:
        """Start argv inside `host` (`ip netns exec` execs it: the pid is the program's),
        output to `log`; stopped at close() if still running."""
        return self._popen(self.ns(host), argv, log, env)

    def _popen(self, ns: str, argv: Sequence[str], log: Path, env: dict | None = None) -> subprocess.Popen[bytes]:
        out = open(log, "ab")
        proc = subprocess.Popen(
            [IP, "netns", "exec", ns, *argv], stdout=out, stderr=subprocess.STDOUT, env=env, start_new_session=True
        )
        self.procs.append((proc, out))
        return proc

    def run(self, host: str, argv: Sequence[str], timeout: float = 30) -> subprocess.CompletedProcess[str]:
        return subprocess.run(self.command(host, argv), capture_output=True, text=True, timeout=timeout)

    @staticmethod
    def stop(proc: subprocess.Popen[bytes], timeout: float = 20) -> int:
        """SIGTERM, then SIGKILL after `timeout`; returns the exit code."""
        return terminate(proc, timeout)

    # -- faults ------------------------------------------------------------------------
    def link_down(self, host: str) -> None:
        """Unplug `host`'s cable: its switch port goes down (eth0 keeps its address;
        packets are dropped, no error reaches the sockets)."""
        _run(IP, "-n", self.switch, "link", "set", self._port(host), "down")

    def link_up(self, host: str) -> None:
        _run(IP, "-n", self.switch, "link", "set", self._port(host), "up")

    def impair(self, hosts: Sequence[str], delay: float, loss: float) -> str:
        """`delay` seconds and `loss` (a fraction) on both directions of each host's link:
        tc netem where the kernel has it, else linkem (tests/support/linkem.py) spliced
        between the host's cable and the switch. Returns which one ("netem" or "linkem")."""
        if netem_unavailable() is None:
            for ns, dev in self._ends(hosts):
                _run(TC, "-n", ns, "qdisc", "replace", "dev", dev, "root", "netem",
                     "delay", f"{delay * 1000:g}ms", "loss", f"{loss * 100:g}%")  # fmt: skip
            return "netem"
        for host in hosts:
            port, spare = self._port(host), f"q{self._port(host)}"
            # the cable now ends at the relay: port <-> linkem <-> spare <-> r.. <-> br0
            _run(IP, "-n", self.switch, "link", "set", port, "nomaster", "promisc", "on")
            _run(IP, "-n", self.switch, "link", "add", spare, "type", "veth", "peer", "name", f"r{port}")
            _run(IP, "-n", self.switch, "link", "set", f"r{port}", "master", "br0", "up")
            _run(IP, "-n", self.switch, "link", "set", spare, "promisc", "on", "up")
            log = self.logdir / f"linkem-{host}.log"
            argv = [sys.executable, LINKEM, port, spare, "--delay", str(delay), "--loss", str(loss)]
            relay = self._popen(self.switch, argv, log)
            self.relays[host] = relay
            wait_for(
                lambda: relay.poll() is not None or "ready" in log.read_text(),
                10,
                0.05,
                f"linkem for {host}",
            )
            if relay.poll() is not None:
                raise RuntimeError(f"linkem for {host} exited: {log.read_text()[-2000:]}")
        return "linkem"

    def clear(self, hosts: Sequence[str]) -> int:
        """Undo impair(): the hosts' links are plain cables again. Returns the frames the
        impairment dropped (netem's or linkem's count)."""
        dropped = 0
        for host in hosts:
            relay = self.relays.pop(host, None)
            if relay is None:
                for ns, dev in self._ends([host]):
                    stats = _run(TC, "-s", "-n", ns, "qdisc", "show", "dev", dev, check=False).stdout
                    dropped += sum(int(n) for n in re.findall(r"dropped (\d+)", stats))
                    _run(TC, "-n", ns, "qdisc", "del", "dev", dev, "root", check=False)
                continue
            self.stop(relay, 5)
            found = re.findall(r"dropped=(\d+)", (self.logdir / f"linkem-{host}.log").read_text())
            dropped += int(found[-1]) if found else 0
            port = self._port(host)
            _run(IP, "-n", self.switch, "link", "del", f"q{port}")
            _run(IP, "-n", self.switch, "link", "set", port, "master", "br0", "promisc", "off")
        return dropped

    def connect_time(self, host: str, address: str, port: int) -> float:
        """Seconds a TCP connect from `host` to address:port takes (one round trip)."""
        code = (
            "import socket,sys,time;t=time.monotonic();"
            f"socket.create_connection(({address!r},{port}),10).close();print(time.monotonic()-t)"
        )
        result = self.run(host, [sys.executable, "-c", code])
        if result.returncode != 0:
            raise RuntimeError(f"connect from {host} to {address}:{port}: {result.stderr.strip()[-500:]}")
        return float(result.stdout)

    def _ends(self, hosts: Sequence[str]) -> list[tuple[str, str]]:
        """(namespace, device) of both ends of each host's cable."""
        return [end for h in hosts for end in ((self.ns(h), "eth0"), (self.switch, self._port(h)))]

    # -- cleanup -----------------------------------------------------------------------
    def close(self) -> None:
        """Stop what we started (SIGTERM, then SIGKILL), kill anything else left in the
        namespaces, delete them. Safe to call twice."""
        deadline = time.monotonic() + 10
        for proc, _ in self.procs:
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        for proc, out in self.procs:
            try:
                proc.wait(max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(10)
            out.close()
        self.procs.clear()
        for ns in reversed(self.made):
            _delete(ns)
        self.made.clear()

    def __enter__(self) -> Lab:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.close()
