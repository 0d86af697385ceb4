"""Issue 12 points 2-4 with real processes: README "Running across hosts securely" step by
step over tcp://127.0.0.1 (a launched pipeline with CURVE, a producer and a `nexus worker`
with keys of their own, an admin and a non-admin CLI, a stranger), and fail-closed start."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys

import pytest
from conftest import REPO, recorder_group, write_config
from recorder import read_handled

from nexus import Producer
from nexus.errors import ExitCode
from nexus.testing import free_port, wait_for

pytestmark = pytest.mark.system


def cli(*args: str, timeout: float = 60) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "nexus", *args], capture_output=True, text=True, check=False, cwd=REPO, timeout=timeout
    )


def ok(result: subprocess.CompletedProcess) -> str:
    assert result.returncode == 0, result.stderr
    return result.stdout


def test_readme_walkthrough_over_tcp_with_curve(tmp_path, launched, monkeypatch):
    router_host, producer_host, member_host = tmp_path / "router", tmp_path / "producer", tmp_path / "member"
    ports = {name: free_port() for name in ("ingest", "confirm", "publish", "coord", "control")}
    endpoints = {name: f"tcp://127.0.0.1:{port}" for name, port in ports.items()}

    # 1. the router host: its key pair, its config
    ok(cli("keys", "generate", "router", "--dir", str(router_host / "keys")))
    router_cfg = write_config(
        router_host,
        router={k: v for k, v in endpoints.items() if k != "control"},
        control=endpoints["control"],
        workers={"rec": recorder_group(router_host / "out", partitions=8)},
        security={"curve": {"secret_key_file": "keys/router.key_secret", "authorized_keys_dir": "keys/authorized"}},
    )
    # 2. and 3. a producer host and a member host: a key pair each, the router's public key copied over
    for host, name in ((producer_host, "mailhost"), (member_host, "worker1"), (tmp_path / "ops", "ops")):
        ok(cli("keys", "generate", name, "--dir", str(host / "keys")))
        shutil.copy(router_host / "keys" / "router.key", host / "keys" / "router.key")
    # ... authorized on the router host (the folder's default from its config)
    authorize = ("-c", str(router_cfg), "keys", "authorize")
    ok(
        cli(
            *authorize,
            "mailhost",
            str(producer_host / "keys/mailhost.key"),
            "--role",
            "producer",
            "--sources",
            "comp*",
            "--types",
            "test.*",
        )
    )
    ok(cli(*authorize, "worker1", str(member_host / "keys/worker1.key"), "--role", "member", "--groups", "rec"))
    ok(cli(*authorize, "ops", str(tmp_path / "ops/keys/ops.key"), "--role", "admin"))
    listed = ok(cli("-c", str(router_cfg), "keys", "list"))
    assert "mailhost" in listed and "worker1" in listed and "ops" in listed

    pipeline = launched(router_cfg)  # ready: the launcher's probes and the local member use the router's key

    def remote_config(host, name: str, **extra) -> str:
        curve = {"secret_key_file": f"keys/{name}.key_secret", "server_key": "keys/router.key"}
        return str(write_config(host, control=endpoints["control"], security={"curve": curve}, **extra))

    router_endpoints = {k: v for k, v in endpoints.items() if k != "control"}
    member_cfg = remote_config(
        member_host,
        "worker1",
        router=router_endpoints,
        workers={"rec": recorder_group(member_host / "out", partitions=8)},
    )
    producer_cfg = remote_config(producer_host, "mailhost", router=router_endpoints)
    member = subprocess.Popen(
        [sys.executable, "-m", "nexus", "-c", member_cfg, "worker", "rec", "--name", "remote-1"],
        cwd=REPO,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        pipeline.wait_members("rec", 2)
        # the SDK on the producer host, keys from the environment as the README shows
        monkeypatch.setenv("NEXUS_CURVE_SECRET_KEY_FILE", str(producer_host / "keys/mailhost.key_secret"))
        monkeypatch.setenv("NEXUS_CURVE_SERVER_KEY", str(producer_host / "keys/router.key"))
        with Producer(endpoints["confirm"], source="comp") as p:
            sent = {p.send("test.item", {"i": i}, key=f"k{i}") for i in range(200)}
            p.flush(20)
        sent.add(ok(cli("-c", producer_cfg, "send", "test.item", "--source", "comp-cli")).strip())

        def handled() -> list:
            return read_handled(str(router_host / "out")) + read_handled(str(member_host / "out"))

        wait_for(lambda: len(handled()) == 201, 30, message="201 events handled")
        assert {row[1] for row in handled()} == sent
        assert read_handled(str(member_host / "out")), "the remote member got partitions and events"

        # outside the producer key's limits: NACKed forbidden
        refused = cli("-c", producer_cfg, "send", "mail.received", "--source", "comp")
        assert refused.returncode == ExitCode.INVALID_EVENT and "forbidden: key mailhost may not send" in refused.stderr

        # non-admin keys: status yes, control and admin commands no
        assert "security: curve on, 3 authorized key(s)" in ok(cli("-c", member_cfg, "status"))
        for command in (
            ("scale", "rec", "2"),
            ("reload",),
            ("dlq", "replay", "--all"),
            ("journal", "replay", "--group", "rec"),
        ):
            denied = cli("-c", member_cfg, *command)
            assert denied.returncode != 0 and "forbidden" in denied.stderr, (command, denied.stderr)
            assert "needs an admin key" in denied.stderr and len(denied.stderr.strip().splitlines()) == 1
        ops_cfg = remote_config(tmp_path / "ops", "ops", router=router_endpoints)
        assert "1 -> 2" in ok(cli("-c", ops_cfg, "scale", "rec", "2"))

        # a stranger (a key of its own, never authorized) is refused and counted
        ok(cli("keys", "generate", "stranger", "--dir", str(tmp_path / "stranger/keys")))
        shutil.copy(router_host / "keys" / "router.key", tmp_path / "stranger/keys/router.key")
        stranger_cfg = remote_config(tmp_path / "stranger", "stranger", router=router_endpoints)
        stranger = cli("-c", stranger_cfg, "send", "test.item", "--source", "comp", "--timeout", "1")
        assert stranger.returncode == ExitCode.UNREACHABLE
        status = pipeline.router_status()
        assert status is not None
        assert status["router"]["security"]["refused"].get("unknown_key", 0) >= 1
        assert status["router"]["rejected_by_reason"]["forbidden"] == 1
        secrets = [
            (host / "keys" / f"{name}.key_secret").read_text().split("secret-key = ")[1][1:41]
            for host, name in ((router_host, "router"), (producer_host, "mailhost"), (member_host, "worker1"))
        ]
        assert not any(s in pipeline.output() for s in secrets)  # no secret key in any log
    finally:
        member.terminate()
        member.wait(30)


def test_a_bind_other_hosts_reach_is_refused_without_curve(tmp_path):
    path = write_config(tmp_path, router={"ingest": f"tcp://0.0.0.0:{free_port()}"})
    result = subprocess.run(
        [sys.executable, "-m", "nexus.launch", "-c", str(path)],
        capture_output=True,
        text=True,
        check=False,
        cwd=REPO,
        timeout=60,
    )
    assert result.returncode == ExitCode.CONFIG
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "router.ingest" in lines[0] and "reachable from other hosts without CURVE" in lines[0]
    assert not os.path.exists(tmp_path / "var" / "journal")  # nothing was started


def test_insecure_true_starts_with_a_warning(tmp_path, launched):
    path = write_config(tmp_path, router={"ingest": f"tcp://0.0.0.0:{free_port()}"}, security={"insecure": True})
    pipeline = launched(path)
    assert "insecure_endpoints" in pipeline.output()
