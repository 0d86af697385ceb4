"""Nexus across hosts, for real: every role in its own network namespace, all over TCP.

    router     python -m nexus.launch (the router; groups a and b have processes: 0)
    members    two `nexus worker a`
    worker     one `nexus worker b`
    producers  tests/support/sender.py (the Producer SDK, confirm mode)
    attacker   the same sender, with a key of its own that nobody authorized

Every host has its own key pair (`nexus keys generate`); the router host authorizes
the members' keys for their groups and the producers' key for its sources
(`nexus keys authorize`), as the README's "Running across hosts securely" says.

The hosts share one switch (tests/netns.py). Faults: the members' cable pulled for 10 s
mid-stream; 50 ms delay and 1 % loss (tc netem) on the members' and producers' links
for 20 s; an attacker with an unknown key (refused and counted, nothing of it handled).
Each test prints a FAULT-REPORT line and checks, event by event, that every ACKed
event reached both groups and that every duplicate handling was flagged redelivered.
Skipped where namespaces cannot be made.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import netns
import pytest
from conftest import recorder_group, write_config
from netns import Lab, unavailable
from recorder import read_handled, tally

from nexus.cli.commands import main as nexus_cli
from nexus.errors import PeerError
from nexus.protocol.client import ControlClient
from nexus.testing import wait_for

pytestmark = pytest.mark.system

SENDER = str(Path(__file__).resolve().parent.parent / "support" / "sender.py")
HOSTS = ["router", "members", "worker", "producers", "attacker"]
PORTS = {"ingest": 5555, "confirm": 5556, "publish": 5557, "coord": 5558}  # the router host's own ports


def report(name: str, **counts) -> None:
    print(f"\nFAULT-REPORT {name}: " + " ".join(f"{k}={v}" for k, v in counts.items()), flush=True)


def make_keys(root: Path) -> Path:
    """Each host's key pair, and the router's list of who may do what, made with the
    CLI as an operator would. The attacker's key is real but never authorized."""
    keys, authorized = root / "keys", root / "keys" / "authorized"
    for name in ("router", "members", "worker", "producers", "attacker"):
        assert nexus_cli(["keys", "generate", name, "--dir", str(keys)]) == 0
    grants = {"members": ["--role", "member", "--groups", "a"], "worker": ["--role", "member", "--groups", "b"]}
    grants["producers"] = ["--role", "producer", "--sources", "*", "--types", "test.*"]
    for name, grant in grants.items():
        assert nexus_cli(["keys", "authorize", name, str(keys / f"{name}.key"), *grant, "--dir", str(authorized)]) == 0
    return keys


def pipeline_config(directory: Path, router_ip: str, outs: dict[str, Path], keys: Path, host: str = "router") -> Path:
    """The config `host` reads: the router binds its TCP endpoints on its host's address
    with CURVE (its own key, the authorized keys), the others connect with their own key
    and the router's public key. The groups have no local processes: their members are
    `nexus worker` on other hosts."""
    if host == "router":
        curve = {"secret_key_file": str(keys / "router.key_secret"), "authorized_keys_dir": str(keys / "authorized")}
    else:
        curve = {"secret_key_file": str(keys / f"{host}.key_secret"), "server_key": str(keys / "router.key")}
    directory = directory / f"config-{host}"
    directory.mkdir(exist_ok=True)
    return write_config(
        directory,
        data_dir=str(directory.parent / "var"),  # one pipeline: the members' configs name the same one
        security={"curve": curve},
        router={
            **{name: f"tcp://{router_ip}:{port}" for name, port in PORTS.items()},
            "heartbeat_interval": "1s",  # the defaults: a member silent 3 s is gone
            "heartbeat_misses": 3,
        },
        workers={group: recorder_group(out, processes=0) for group, out in outs.items()},
    )


class Cluster:
    """The lab, the config, the launcher on `router` and the members on their hosts."""

    def __init__(self, lab: Lab, root: Path):
        self.lab, self.root = lab, root
        self.outs = {"a": root / "a", "b": root / "b"}
        self.keys = make_keys(root)
        self.path = pipeline_config(root, lab.address("router"), self.outs, self.keys)
        self.confirm = f"tcp://{lab.address('router')}:{PORTS['confirm']}"
        self.launcher = lab.popen(
            "router", [sys.executable, "-m", "nexus.launch", "-c", str(self.path)], root / "launch.log"
        )
        self.wait_ready()
        self.members = [
            self.worker("members", "a", "a-1"),
            self.worker("members", "a", "a-2"),
            self.worker("worker", "b", "b-1"),
        ]
        self.wait_members({"a": 2, "b": 1})

    def worker(self, host: str, group: str, name: str):
        path = pipeline_config(self.root, self.lab.address("router"), self.outs, self.keys, host)
        argv = [sys.executable, "-m", "nexus", "worker", group, "--name", name, "-c", str(path)]
        return self.lab.popen(host, argv, self.root / f"{name}.log")

    def log(self, name: str) -> str:
        return (self.root / f"{name}.log").read_text(errors="replace")[-3000:]

    def wait_ready(self) -> None:
        from nexus import config

        control = ControlClient(config.load(self.path).control_endpoint, 0.5)  # ipc: the filesystem is shared

        def ready():
            if self.launcher.poll() is not None:
                raise RuntimeError(f"launcher exited with {self.launcher.returncode}:\n{self.log('launch')}")
            try:
                return control.status().get("ready")
            except PeerError:
                return False

        wait_for(ready, 30, 0.1, "the launcher on host router ready")

    def router_status(self, host: str = "router") -> dict:
        """The router's status as `nexus status --json` on `host` sees it over TCP."""
        argv = [sys.executable, "-m", "nexus", "status", "--json", "-c", str(self.path)]
        result = self.lab.run(host, argv)
        return json.loads(result.stdout) if result.returncode == 0 and result.stdout.strip() else {}

    def members_in(self, group: str) -> int:
        return len(self.router_status().get("groups", {}).get(group, {}).get("members", []))

    def wait_members(self, want: dict[str, int], timeout: float = 30) -> None:
        def joined():
            for p in self.members:
                if p.poll() is not None:
                    raise RuntimeError(f"a member exited with {p.returncode}")
            groups = self.router_status().get("groups", {})
            return all(
                len(groups.get(g, {}).get("members", [])) == n and groups[g]["unassigned"] == 0 for g, n in want.items()
            )

        wait_for(joined, timeout, 0.3, f"members joined: {want}")

    def send(self, host: str, total: int, chunk: int, pace: float, source: str, flush_timeout: float = 120):
        acked = self.root / f"acked-{source}.txt"
        argv = [sys.executable, SENDER, self.confirm, "--total", str(total), "--acked", str(acked)]
        argv += ["--chunk", str(chunk), "--pace", str(pace), "--source", source, "--flush-timeout", str(flush_timeout)]
        # a program without a config takes its keys from the environment (SDK)
        env = {
            **os.environ,
            "NEXUS_CURVE_SECRET_KEY_FILE": str(self.keys / f"{host}.key_secret"),
            "NEXUS_CURVE_SERVER_KEY": str(self.keys / "router.key"),
        }
        return self.lab.popen(host, argv, self.root / f"sender-{source}.log", env=env), acked

    def handled(self, group: str) -> list:
        return read_handled(str(self.outs[group]))

    def wait_delivered(self, ids: set[str], timeout: float = 60) -> None:
        for group in self.outs:
            wait_for(
                lambda g=group: ids <= {row[1] for row in self.handled(g)},
                timeout,
                0.2,
                f"all {len(ids)} ACKed events handled by group {group}",
            )

    def close(self) -> None:
        for p in self.members:  # members first: they ack and leave while the router is up
            self.lab.stop(p)
        self.lab.stop(self.launcher, 30)


def acked_ids(path: Path) -> list[str]:
    return path.read_text().split() if path.exists() else []


def counts(cluster: Cluster, acked: list[str]) -> tuple[dict, dict[str, set[str]]]:
    """Delivered, lost and duplicates (flagged, unflagged) per group, over the ACKed ids."""
    out: dict = {}
    delivered: dict[str, set[str]] = {}
    for group in cluster.outs:
        handled, flagged, unflagged = tally(cluster.handled(group))
        delivered[group] = handled
        out[f"delivered_{group}"] = len(set(acked) & handled)
        out[f"lost_{group}"] = len(set(acked) - handled)
        out[f"dup_flagged_{group}"] = flagged
        out[f"dup_unflagged_{group}"] = unflagged
    return out, delivered


def check(cluster: Cluster, acked: list[str], delivered: dict[str, set[str]], found: dict) -> None:
    for group in cluster.outs:
        missing = set(acked) - delivered[group]
        assert not missing, f"group {group}: {len(missing)} ACKed events never handled, e.g. {sorted(missing)[:3]}"
        assert found[f"dup_unflagged_{group}"] == 0, f"group {group}: duplicates not flagged redelivered"


@pytest.fixture
def cluster(tmp_path):
    reason = unavailable()
    if reason:
        pytest.skip(f"multi-host tests need network namespaces: {reason}")
    with Lab(HOSTS, logdir=tmp_path) as lab:
        c = None
        try:
            c = Cluster(lab, tmp_path)
            yield c
        finally:
            if c is not None:
                c.close()


def test_members_link_down_10s_mid_stream(cluster):
    sender, acked_file = cluster.send("producers", total=3000, chunk=100, pace=0.5, source="linkdown")  # ~15 s
    wait_for(lambda: len(acked_ids(acked_file)) >= 500, 30, 0.1, "500 events ACKed before the fault")
    cluster.lab.link_down("members")
    down_at = time.monotonic()
    acked_at_down = len(acked_ids(acked_file))
    # the router notices the members are gone (3 missed heartbeats) while producers go on
    wait_for(lambda: cluster.members_in("a") == 0, 9, 0.3, "the router to drop group a's unreachable members")
    time.sleep(max(0.0, 10 - (time.monotonic() - down_at)))  # the fault lasts 10 s: its length, not a sync
    acked_during = len(acked_ids(acked_file)) - acked_at_down
    cluster.lab.link_up("members")
    cluster.wait_members({"a": 2}, 30)
    assert sender.wait(120) == 0, cluster.log("sender-linkdown")
    acked = acked_ids(acked_file)
    cluster.wait_delivered(set(acked))
    found, delivered = counts(cluster, acked)
    report("netns_members_link_down", sent=3000, acked=len(acked), acked_while_down=acked_during, **found)
    assert len(acked) == 3000
    assert acked_during > 0, "producers were held back by the unreachable members"
    check(cluster, acked, delivered, found)


def test_delay_and_loss_20s(cluster):
    lab, router = cluster.lab, cluster.lab.address("router")
    plain_rtt = lab.connect_time("producers", router, PORTS["confirm"])
    how = lab.impair(["members", "producers"], delay=0.05, loss=0.01)  # tc netem, or linkem without it
    impaired_at = time.monotonic()
    rtt = lab.connect_time("producers", router, PORTS["confirm"])  # 50 ms each way: >= 100 ms
    sender, acked_file = cluster.send("producers", total=4000, chunk=100, pace=0.3, source="netem")  # ~15 s + RTTs
    assert sender.wait(120) == 0, cluster.log("sender-netem")
    time.sleep(max(0.0, 20 - (time.monotonic() - impaired_at)))  # the fault lasts 20 s: its length, not a sync
    impaired_for = time.monotonic() - impaired_at
    dropped = lab.clear(["members", "producers"])
    acked = acked_ids(acked_file)
    cluster.wait_delivered(set(acked))
    found, delivered = counts(cluster, acked)
    report(
        "netns_delay_loss",
        impairment=how,
        rtt_ms=f"{plain_rtt * 1000:.1f}->{rtt * 1000:.1f}",
        impaired_s=round(impaired_for, 1),
        frames_dropped=dropped,
        sent=4000,
        acked=len(acked),
        **found,
    )
    assert rtt >= 0.095, f"the impairment is not in the path: a connect took {rtt * 1000:.1f} ms"
    assert dropped > 0, "1 % loss dropped no frame"
    assert len(acked) == 4000
    check(cluster, acked, delivered, found)


def test_attacker_with_an_unknown_key(cluster):
    sender, acked_file = cluster.send("producers", total=1000, chunk=100, pace=0.1, source="legit")
    attacker, attack_file = cluster.send("attacker", total=200, chunk=50, pace=0.0, source="attacker", flush_timeout=5)
    assert sender.wait(60) == 0, cluster.log("sender-legit")
    attacker.wait(60)
    acked, accepted = acked_ids(acked_file), acked_ids(attack_file)
    security = cluster.router_status().get("router", {}).get("security", {})
    refused_unknown = security.get("refused", {}).get("unknown_key", 0)
    cluster.wait_delivered(set(acked) | set(accepted))  # what was let in is handled too (counted below)
    found, delivered = counts(cluster, acked)
    reached = {g: len(set(accepted) & delivered[g]) for g in cluster.outs}
    report(
        "netns_attacker",
        sent=1000,
        acked=len(acked),
        **found,
        attacker_sent=200,
        attacker_acked=len(accepted),
        attacker_refused=200 - len(accepted),
        router_refused_unknown_key=refused_unknown,
        attacker_handled_a=reached["a"],
        attacker_handled_b=reached["b"],
    )
    assert len(acked) == 1000
    check(cluster, acked, delivered, found)
    assert not accepted and not any(reached.values()), "the attacker's events got in"
    assert refused_unknown >= 1, f"the attacker's handshakes were not counted: {security}"


def test_lab_removes_a_crashed_runs_namespaces_and_its_own(tmp_path):
    reason = unavailable()
    if reason:
        pytest.skip(f"needs network namespaces: {reason}")
    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()  # a pid that no longer runs: the "crashed" run that made the namespace
    leftover = f"{netns.PREFIX}{gone.pid}-router"
    subprocess.run([netns.IP, "netns", "add", leftover], check=True)
    try:
        with Lab(["one", "two"], logdir=tmp_path) as lab:
            assert leftover not in netns._namespaces()
            listen = "import socket, time; s = socket.create_server(('0.0.0.0', 7000)); time.sleep(60)"
            sleeper = lab.popen("one", [sys.executable, "-c", listen], tmp_path / "s.log")

            def reachable():  # host two reaches host one across the switch
                try:
                    return lab.connect_time("two", lab.address("one"), 7000) >= 0
                except RuntimeError:
                    return False

            wait_for(reachable, 10, 0.1, "host two connects to host one")
            ours = [ns for ns in netns._namespaces() if ns.startswith(lab.tag)]
            assert sorted(ours) == sorted([lab.ns("one"), lab.ns("two"), lab.switch])
        assert sleeper.poll() is not None
        assert not [ns for ns in netns._namespaces() if ns.startswith(lab.tag)]
    finally:
        subprocess.run([netns.IP, "netns", "delete", leftover], capture_output=True)
