"""Private by default (issue 12, point 1), with a real launched pipeline and a real
second user.

A pipeline runs events through every kind of state it keeps (journal, cursors, dead
letters, a file source and its status file, black boxes, locks, the ipc sockets);
then every folder under the data dir must be 0700, every file 0600 and every socket
0600. A probe forked from this process and switched to the unprivileged user `nobody`
tries to read a journal segment, the dead-letter database, the cursors file and the
HTTP token the launcher made, to connect to the ingest/confirm/coord/control sockets
and send an event, and to use the HTTP port on loopback (default config: no
http.token set): every attempt must fail (a permission error, 401 from every route but
/healthz and /readyz) and the router's accepted count must not move. The
probe first proves it can read and send where the modes allow it (a 0644 file and a
0777 socket next to the data dir), so a denial is the data dir's doing.

Also: a data dir others can write is refused with one line (exit 3), and one an
older version left readable is tightened with a warning.
"""

from __future__ import annotations

import grp
import json
import multiprocessing
import os
import pwd
import shutil
import socket
import stat
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
import zmq
from conftest import write_config
from recorder import read_handled

from nexus import Producer
from nexus.testing import LaunchedPipeline, free_port, wait_for

WAIT = 30.0
EVENTS, POISON = 20, 2
HTTP_PATHS = (
    "/healthz",
    "/readyz",
    "/",
    "/metrics",
    "/api/state",
    "/api/stream",
    "/api/deadletters",
    "/api/deadletters/1",
)


def port_of(listen: str) -> int:
    return int(listen.rpartition(":")[2])


def http_status(url: str) -> int | str:
    """The status of a GET (a refused connection is reported, not a status)."""
    import urllib.error
    import urllib.request

    try:
        with urllib.request.urlopen(url, timeout=10) as resp:
            return resp.status
    except urllib.error.HTTPError as exc:
        return exc.code
    except OSError as exc:
        return f"{type(exc).__name__}: {exc}"


@pytest.fixture
def open_root():
    """A folder anyone may traverse (pytest's tmp_path is 0700 and would hide the data
    dir from the probe by itself): what keeps the probe out must be the data dir."""
    root = Path(tempfile.mkdtemp(prefix="nexus-privacy-"))
    os.chmod(root, 0o755)
    yield root
    shutil.rmtree(root, ignore_errors=True)


def _config(root: Path, **extra) -> Path:
    out = root / "out"
    out.mkdir()
    return write_config(
        root,
        # the HTTP port as by default: loopback, no http.token (the launcher makes one)
        http={"listen": f"127.0.0.1:{free_port()}"},
        **extra,
        producers={
            "inbox": {"kind": "file", "paths": [str(root / "inbox")], "create_missing": True, "debounce": "50ms"}
        },
        workers={
            "rec": {
                "handler": "recorder:poisonable",
                "subscribe": ["test.*", "file.*"],
                "start": "earliest",
                "partitions": 4,
                "retry": {"attempts": 1, "backoff": ["0.1s"]},
                "options": {"out": str(out), "fixed": str(root / "never")},
            }
        },
    )


def _walk(data_dir: str) -> tuple[list[str], dict[str, list[str]]]:
    """(entries whose mode is wrong, the entries seen by kind)."""
    wrong: list[str] = []
    seen: dict[str, list[str]] = {"dir": [], "file": [], "socket": []}
    for top, dirs, files in os.walk(data_dir):
        for name in [top, *(os.path.join(top, f) for f in files)]:
            st = os.lstat(name)
            mode = stat.S_IMODE(st.st_mode)
            rel = os.path.relpath(name, data_dir)
            if stat.S_ISDIR(st.st_mode):
                seen["dir"].append(rel)
                ok = mode == 0o700
            elif stat.S_ISSOCK(st.st_mode):
                seen["socket"].append(rel)
                ok = mode & 0o077 == 0 and mode & 0o600 == 0o600
            else:
                seen["file"].append(rel)
                ok = stat.S_ISREG(st.st_mode) and mode == 0o600
            if not ok:
                wrong.append(f"{rel} {mode:04o}")
        assert not [d for d in dirs if os.path.islink(os.path.join(top, d))]
    return wrong, seen


def _run_through_every_state(root: Path, pipeline: LaunchedPipeline) -> None:
    cfg = pipeline.cfg
    pipeline.wait_members("rec", 1, WAIT)
    with Producer(cfg.confirm, source="privacy-test") as p:
        for i in range(EVENTS):
            p.send("test.ok", {"i": i})
        for i in range(POISON):
            p.send("test.poison", {"i": i, "poison": True})
        p.flush(WAIT)
    # the source makes the folder, then sets its watches: a file written before is not seen
    wait_for(lambda: "file_watch_started" in pipeline.output(), WAIT, message="the file source watching")
    (root / "inbox" / "note.txt").write_text("hello")
    wait_for(
        lambda: len(read_handled(str(root / "out"))) >= EVENTS + 1,
        WAIT,
        message="every good event and the file event handled",
    )
    wait_for(
        lambda: (pipeline.router_status() or {}).get("groups", {}).get("rec", {}).get("dead_letters") == POISON,
        WAIT,
        message="the poison events dead-lettered",
    )
    data = Path(cfg.data_dir)
    wait_for(lambda: (data / "cursors.msgpack").exists(), WAIT, message="the cursors saved")
    wait_for(lambda: (data / "run" / "status" / "inbox.json").exists(), WAIT, message="the file source's status")


def test_every_file_folder_and_socket_is_private_after_a_run(open_root, launched):
    pipeline = launched(_config(open_root))
    _run_through_every_state(open_root, pipeline)
    data_dir = pipeline.cfg.data_dir
    assert stat.S_IMODE(os.stat(data_dir).st_mode) == 0o700
    wrong, seen = _walk(data_dir)
    files = set(seen["file"])
    # every kind of state is there (else the walk proves less than it claims)
    for expected in (
        "cursors.msgpack",
        "dlq.sqlite3",
        "dlq.sqlite3-wal",
        "dlq.sqlite3-shm",
        "launcher.lock",
        "router.lock",
        "run/status/inbox.json",
        "run/box/router.box",
        "run/box/rec-0.box",
        "http.token",
    ):
        assert expected in files, f"{expected} not in the data dir: {sorted(files)}"
    assert any(f.startswith("journal/") and f.endswith(".seg") for f in files), sorted(files)
    assert {"run/ingest", "run/confirm", "run/coord", "run/publish", "run/control"} <= set(seen["socket"]), seen
    assert not wrong, f"entries not private: {wrong}"
    print(f"PRIVACY-REPORT walk: dirs={len(seen['dir'])} files={len(files)} sockets={len(seen['socket'])} wrong=0")


# -- the unprivileged probe ---------------------------------------------------------------
def _probe(
    uid: int, gid: int, files: dict, sockets: dict, confirm: str, ingest: str, canary: dict, http_base: str, conn
) -> None:
    """Runs in a forked child: become `nobody`, then try everything; report as JSON."""
    out: dict = {}
    try:
        os.setgroups([])
        os.setgid(gid)
        os.setuid(uid)
        out["uid"] = os.getuid()

        def attempt(fn) -> str:
            try:
                fn()
                return "ok"
            except PermissionError:
                return "denied"
            except Exception as exc:  # noqa: BLE001 - reported, the test decides
                return f"{type(exc).__name__}: {exc}"

        def read(path: str) -> None:
            with open(path, "rb") as f:
                f.read(1)

        def connect(path: str) -> None:
            with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
                s.settimeout(2)
                s.connect(path)

        out["canary_read"] = attempt(lambda: read(canary["file"]))
        ctx = zmq.Context()
        push = ctx.socket(zmq.PUSH)
        push.setsockopt(zmq.LINGER, 2000)
        push.connect(canary["endpoint"])

        def send_canary() -> None:
            if not push.poll(3000, zmq.POLLOUT):  # a PUSH is writable once connected
                raise TimeoutError("not connected")
            push.send(b"from nobody", zmq.NOBLOCK)

        out["canary_send"] = attempt(send_canary)
        push.close()
        out["read"] = {name: attempt(lambda p=path: read(p)) for name, path in files.items()}
        out["connect"] = {name: attempt(lambda p=path: connect(p)) for name, path in sockets.items()}
        out["http"] = {path: http_status(http_base + path) for path in HTTP_PATHS}
        # and the real thing: a confirmed event (must never be ACKed) and a fired one
        from nexus.errors import NexusError

        producer = Producer(confirm, source="intruder", ack_timeout=0.5)
        producer.send("test.ok", {"from": "nobody"})
        try:
            producer.flush(3)
            out["confirmed"] = "acked"
        except NexusError as exc:
            out["confirmed"] = f"not acked: {type(exc).__name__}"
        try:
            producer.close(timeout=0.2)
        except NexusError:
            pass  # unacked events: expected
        fire = Producer(ingest, source="intruder", confirm=False)
        fire.send("test.ok", {"from": "nobody", "fire": True})
        try:
            fire.close(timeout=2)
            out["fired"] = "delivered to zmq"
        except NexusError as exc:
            out["fired"] = f"not delivered: {type(exc).__name__}"
        ctx.term()
    except BaseException as exc:  # noqa: BLE001
        out["error"] = f"{type(exc).__name__}: {exc}"
    conn.send(json.dumps(out))
    conn.close()
    os._exit(0)  # no cleanup of what the parent owns (its zmq context, pytest)


@pytest.mark.parametrize("with_group", [False, True], ids=["private", "ipc_group"])
def test_another_user_can_read_nothing_and_send_nothing(open_root, launched, with_group):
    """Private: nothing at all. With `security.ipc_group` set to the probe's group: the
    sockets, and still no file (the data dir is searchable then, so the files' own
    0600 is what keeps dlq.sqlite3 and cursors.msgpack closed)."""
    try:
        nobody = pwd.getpwnam("nobody")
    except KeyError:
        pytest.skip("no user named nobody to probe with")
    if os.geteuid() != 0:
        pytest.skip("the probe switches to another user: needs root")
    group = grp.getgrgid(nobody.pw_gid).gr_name
    pipeline = launched(_config(open_root, **({"security": {"ipc_group": group}} if with_group else {})))
    _run_through_every_state(open_root, pipeline)
    cfg = pipeline.cfg
    data = Path(cfg.data_dir)
    segment = sorted((data / "journal").glob("*.seg"))[0]
    files = {
        "segment": str(segment),
        "dlq": str(data / "dlq.sqlite3"),
        "cursors": str(data / "cursors.msgpack"),
        "http token": str(data / "http.token"),
    }
    sockets = {
        n: e[len("ipc://") :]
        for n, e in (
            ("ingest", cfg.ingest),
            ("confirm", cfg.confirm),
            ("coord", cfg.coord),
            ("control", cfg.control_endpoint),
        )
    }
    # the control: what the modes allow, the probe can do
    canary_file = open_root / "canary.txt"
    canary_file.write_text("readable")
    canary_file.chmod(0o644)
    canary_sock = open_root / "canary.sock"
    ctx = zmq.Context()
    pull = ctx.socket(zmq.PULL)
    pull.setsockopt(zmq.LINGER, 0)
    pull.bind(f"ipc://{canary_sock}")
    canary_sock.chmod(0o777)
    http_base = f"http://127.0.0.1:{port_of(cfg.http.listen)}"
    wait_for(lambda: http_status(http_base + "/readyz") == 200, WAIT, message="the HTTP port ready")
    before = pipeline.router_status()["router"]["accepted"]
    receiver, sender = multiprocessing.Pipe(duplex=False)
    probe = multiprocessing.get_context("fork").Process(
        target=_probe,
        args=(
            nobody.pw_uid,
            nobody.pw_gid,
            files,
            sockets,
            cfg.confirm,
            cfg.ingest,
            {"file": str(canary_file), "endpoint": f"ipc://{canary_sock}"},
            http_base,
            sender,
        ),
    )
    try:
        probe.start()
        sender.close()
        assert receiver.poll(WAIT), "the probe did not report"
        report = json.loads(receiver.recv())
        probe.join(WAIT)
        assert pull.poll(5000), "the canary socket got nothing from the probe"
        assert pull.recv() == b"from nobody"
    finally:
        if probe.is_alive():
            probe.kill()
        pull.close()
        ctx.term()
    print(f"PRIVACY-REPORT probe: {json.dumps(report, sort_keys=True)}")
    assert "error" not in report, report
    assert report["uid"] == nobody.pw_uid
    assert report["canary_read"] == "ok" and report["canary_send"] == "ok", report
    assert report["read"] == {name: "denied" for name in files}, report
    # the HTTP port (loopback, any local user reaches it): the probes answer, nothing else
    # without the token only the pipeline's user can read (events in the tail, dead letters)
    assert report["http"] == {path: 200 if path in ("/healthz", "/readyz") else 401 for path in HTTP_PATHS}, report
    if with_group:
        assert stat.S_IMODE(data.stat().st_mode) == 0o710 and data.stat().st_gid == nobody.pw_gid
        assert report["connect"] == {name: "ok" for name in sockets}, report
        assert report["confirmed"] == "acked", report
    else:
        assert report["connect"] == {name: "denied" for name in sockets}, report
        assert report["confirmed"].startswith("not acked"), report
    # one event of ours, ACKed: everything the probe could have sent would be in by then
    with Producer(cfg.confirm, source="privacy-test") as p:
        p.send("test.ok", {"after": "probe"})
        p.flush(WAIT)
    theirs = 2 if with_group else 0  # the group's member: its confirmed and its fired event
    wait_for(
        lambda: pipeline.router_status()["router"]["accepted"] >= before + 1 + theirs,
        WAIT,
        message="the events accepted",
    )
    after = pipeline.router_status()["router"]["accepted"]
    assert after == before + 1 + theirs, f"accepted {before} -> {after}"


# -- refusing and tightening --------------------------------------------------------------
@pytest.mark.parametrize("mode", [0o777, 0o770, 0o703])
def test_a_data_dir_others_can_write_is_refused(open_root, mode):
    config = _config(open_root)
    data_dir = open_root / "var"
    data_dir.mkdir()
    data_dir.chmod(mode)
    run = subprocess.run(
        [sys.executable, "-m", "nexus.launch", "-c", str(config)], capture_output=True, text=True, timeout=WAIT
    )
    assert run.returncode == 3, run
    lines = run.stderr.strip().splitlines()
    expected = f"nexus: data_dir {data_dir} is writable by others (mode {mode:04o}): make it private first"
    assert lines == [f"{expected} (chmod 700 {data_dir})"], run.stderr
    assert os.listdir(data_dir) == [] and stat.S_IMODE(data_dir.stat().st_mode) == mode  # nothing touched


def test_an_older_readable_data_dir_is_tightened_with_a_warning(open_root, launched):
    config = _config(open_root)
    data_dir = open_root / "var"
    (data_dir / "imap").mkdir(parents=True)
    old = data_dir / "imap" / "mail.json"
    old.write_text("{}")
    for path, mode in ((data_dir, 0o755), (data_dir / "imap", 0o755), (old, 0o644)):
        path.chmod(mode)
    pipeline = launched(config)
    out = pipeline.output()
    assert "data_dir_permissions_tightened" in out, out[-3000:]
    warning = next(line for line in out.splitlines() if "data_dir_permissions_tightened" in line)
    assert "entries=3" in warning, warning
    assert stat.S_IMODE(data_dir.stat().st_mode) == 0o700
    assert stat.S_IMODE((data_dir / "imap").stat().st_mode) == 0o700
    assert stat.S_IMODE(old.stat().st_mode) == 0o600
