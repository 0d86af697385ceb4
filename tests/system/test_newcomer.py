"""Issue 11 point 6 with real processes: the CLI with no pipeline fails at once, `tail`
waits for one, a handler module that raises at import is one line and a reason in
`nexus status`, handlers and contracts next to the config are found from any cwd."""

from __future__ import annotations

import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import zmq
from conftest import REPO, recorder_group, write_config
from recorder import read_handled

from nexus import config
from nexus.errors import ExitCode
from nexus.testing import free_port, wait_for

pytestmark = pytest.mark.system


# where tests/support/broken_import.py raises: the one line must name that file and line
_BROKEN = (Path(__file__).resolve().parents[1] / "support" / "broken_import.py").read_text().splitlines()
BROKEN_AT = f"broken_import.py:{next(n for n, line in enumerate(_BROKEN, 1) if 'raise RuntimeError' in line)}"


def cli(*args, cwd: str = REPO, timeout: float = 60) -> tuple[subprocess.CompletedProcess, float]:
    started = time.monotonic()
    result = subprocess.run(
        [sys.executable, "-m", "nexus", *args], capture_output=True, text=True, check=False, cwd=cwd, timeout=timeout
    )
    return result, time.monotonic() - started


COMMANDS = [
    ("status",),
    ("send", "test.x", "--payload", '{"n": 1}'),
    ("send", "test.x", "--fire"),
    ("scale", "rec", "2"),
    ("dlq", "list"),
    ("journal", "info"),
    ("reload",),
]


@pytest.mark.parametrize("transport_kind", ["ipc", "tcp"])
def test_cli_fails_at_once_when_no_pipeline_runs(tmp_path, transport_kind):
    overrides = {}
    if transport_kind == "tcp":
        ports = [free_port() for _ in range(4)]
        overrides = {
            "router": {
                "ingest": f"tcp://127.0.0.1:{ports[0]}",
                "confirm": f"tcp://127.0.0.1:{ports[1]}",
                "coord": f"tcp://127.0.0.1:{ports[2]}",
            },
            "control": f"tcp://127.0.0.1:{ports[3]}",
        }
    path = write_config(tmp_path, workers={"rec": recorder_group(tmp_path / "out")}, **overrides)
    for command in COMMANDS:
        for argv in (("-c", str(path), *command), (*command, "-c", str(path))):  # -c before or after
            result, took = cli(*argv)
            print(f"FAIL-FAST {transport_kind} nexus {' '.join(command)}: {took:.2f}s exit {result.returncode}")
            assert result.returncode == ExitCode.UNREACHABLE, result.stderr
            lines = result.stderr.strip().splitlines()
            assert len(lines) == 1 and "is not running" in lines[0], result.stderr
            assert "Traceback" not in result.stderr and not result.stdout
            assert took < 5, f"nexus {' '.join(command)} took {took:.1f}s with no pipeline"  # sanity, not a benchmark


def test_commands_still_wait_for_a_pipeline_that_listens_but_is_slow(tmp_path):
    """The probe only rules out 'nothing there': bound sockets that do not answer (a
    pipeline stopped with SIGSTOP, say) get the whole timeout; status asks both at once."""
    path = write_config(tmp_path)
    cfg = config.load(path)
    from nexus.protocol import transport

    socks = [
        transport.bind(zmq.Context.instance(), zmq.ROUTER, e, linger_ms=0)
        for e in (cfg.confirm, cfg.coord, cfg.control_endpoint)
    ]
    stop = threading.Event()

    def swallow():
        poller = zmq.Poller()
        for sock in socks:
            poller.register(sock, zmq.POLLIN)
        while not stop.is_set():
            for sock, _ in poller.poll(50):
                sock.recv_multipart()

    thread = threading.Thread(target=swallow, daemon=True)
    thread.start()
    try:
        send, send_took = cli("send", "test.x", "--timeout", "2", "-c", str(path))
        status, status_took = cli("status", "-c", str(path))
    finally:
        stop.set()
        thread.join(5)
        for sock in socks:
            sock.close(0)
    print(
        f"SLOW-PIPELINE nexus send --timeout 2: {send_took:.2f}s exit {send.returncode}; "
        f"nexus status: {status_took:.2f}s exit {status.returncode}"
    )
    assert send.returncode == ExitCode.UNREACHABLE and send_took >= 2
    assert "did not confirm" in send.stderr and "is not running" not in send.stderr
    assert status.returncode == ExitCode.UNREACHABLE and status_took >= 3
    assert status.stderr.count("did not answer within 3s") == 2 and len(status.stderr.strip().splitlines()) == 1


def test_tail_says_it_waits_for_a_pipeline_then_prints_events(tmp_path, launched):
    path = write_config(tmp_path, workers={"rec": recorder_group(tmp_path / "out")})
    out, err = open(tmp_path / "tail.out", "w+"), open(tmp_path / "tail.err", "w+")
    tail = subprocess.Popen(
        [sys.executable, "-m", "nexus", "tail", "test.*", "--count", "1", "-c", str(path)],
        stdout=out,
        stderr=err,
        cwd=REPO,
    )
    try:
        wait_for(
            lambda: "waiting for a pipeline" in (tmp_path / "tail.err").read_text(), 20, message="tail says it waits"
        )
        assert tail.poll() is None
        p = launched(path)
        wait_for(lambda: "pipeline found" in (tmp_path / "tail.err").read_text(), 20, message="tail sees it")
        sent = []

        def delivered():  # tail subscribes asynchronously: send until one shows
            result, _ = cli("send", "test.tailed", "--payload", '{"n": 1}', "-c", p.config_path)
            assert result.returncode == 0, result.stderr
            sent.append(result.stdout.strip())
            return tail.poll() is not None

        wait_for(delivered, 30, 0.2, "tail printed an event")
        assert tail.returncode == 0
        text = (tmp_path / "tail.out").read_text()
        assert "test.tailed" in text
        assert len((tmp_path / "tail.err").read_text().strip().splitlines()) == 2
    finally:
        if tail.poll() is None:
            tail.kill()
        tail.wait(10)
        out.close()
        err.close()


def test_a_handler_module_that_raises_at_import_fails_its_group_once_with_the_reason(tmp_path, launched):
    out = tmp_path / "out"
    path = write_config(
        tmp_path, workers={"rec": recorder_group(out), "bad": {"handler": "broken_import:handle", "processes": 2}}
    )
    p = launched(path, wait_ready=False)

    def bad_members():
        procs = [x for x in p.processes() if x["group"] == "bad"]
        return procs if len(procs) == 2 and all(x["state"] == "failed" for x in procs) else None

    procs = wait_for(bad_members, 30, 0.1, "both bad members failed")
    where = BROKEN_AT
    for proc in procs:
        assert proc["restarts"] == 0  # exit 3: not restarted, no crash loop
        assert proc["last_exit"].startswith(
            "config error: handler broken_import:handle: cannot import broken_import: RuntimeError: missing API key"
        )
        assert proc["last_exit"].endswith(f"{where})")
    # the other group works; the pipeline never claims ready
    result, _ = cli("send", "test.ok", "--payload", "{}", "-c", p.config_path)
    assert result.returncode == 0, result.stderr
    wait_for(lambda: len(read_handled(str(out))) == 1, 20, message="rec handled the event")
    assert p.control("status")["ready"] is False
    log = p.output()
    assert "Traceback" not in log and "member_crashed" not in log
    assert log.count("group_failed") == 1 and log.count(where) == 1, log
    assert "pipeline_ready" not in log
    status, _ = cli("status", "-c", p.config_path)
    assert status.returncode == 0
    rows = [line for line in status.stdout.splitlines() if line.startswith("bad-")]
    assert len(rows) == 2 and all("RuntimeError: missing API key" in r and where in r for r in rows), status.stdout
    print(
        f"BROKEN-HANDLER log lines: {len(log.splitlines())}, tracebacks: {log.count('Traceback')}, "
        f"restarts: {[x['restarts'] for x in procs]}"
    )


def test_handlers_and_contracts_next_to_the_config_are_found_from_any_cwd(tmp_path, launched):
    conf, out = tmp_path / "conf", tmp_path / "out"
    conf.mkdir()
    out.mkdir()
    (conf / "nextdoor_contracts.py").write_text(
        "from nexus import Contract, contract\n\n@contract('nextdoor.ping', v=1)\nclass Ping(Contract):\n    n: int\n"
    )
    (conf / "nextdoor_handlers.py").write_text(
        "import os\n\ndef handle(event, ctx):\n"
        "    with open(os.path.join(ctx.options['out'], event.id), 'w') as f:\n"
        "        f.write(str(event.payload.n))\n"
    )
    path = write_config(
        conf,
        contracts=["nexus.contracts", "nextdoor_contracts"],
        workers={
            "next": {
                "handler": "nextdoor_handlers:handle",
                "subscribe": ["nextdoor.*"],
                "start": "earliest",
                "options": {"out": str(out)},
            }
        },
    )
    p = launched(path)  # the launcher runs in the repo, not in conf/
    # `nexus send` from / finds the contract too: a bad payload fails locally, before the router
    result, _ = cli("send", "nextdoor.ping", "--payload", '{"n": "x"}', "-c", p.config_path, cwd="/")
    assert result.returncode == ExitCode.INVALID_EVENT and "rejected by router" not in result.stderr, result.stderr
    result, _ = cli("send", "nextdoor.ping", "--payload", '{"n": 7}', "-c", p.config_path, cwd="/")
    assert result.returncode == 0, result.stderr
    event_id = result.stdout.strip()
    wait_for(
        lambda: (out / event_id).exists() and (out / event_id).read_text() == "7",
        20,
        message="the handler next to the config handled it",
    )


def test_a_contract_module_that_raises_at_import_stops_the_start_with_one_line(tmp_path):
    path = write_config(tmp_path, contracts=["nexus.contracts", "broken_import"])
    started = time.monotonic()
    result = subprocess.run(
        [sys.executable, "-m", "nexus.launch", "-c", str(path)], capture_output=True, text=True, timeout=60, cwd=REPO
    )
    text = result.stdout + result.stderr
    print(
        f"BROKEN-CONTRACTS launcher exit {result.returncode} after {time.monotonic() - started:.2f}s, "
        f"{len(text.splitlines())} log lines"
    )
    assert result.returncode == ExitCode.CONFIG
    assert "Traceback" not in text
    failed = [line for line in text.splitlines() if "launch_failed" in line]
    assert len(failed) == 1 and "contracts: cannot import broken_import: RuntimeError: missing API key" in failed[0]
    assert BROKEN_AT in failed[0] and text.count(BROKEN_AT) == 1
