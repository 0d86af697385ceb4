"""System test: the long CLI commands show progress (count, rate, ETA) on a terminal and
nothing of it with --json or through a pipe.

The commands run under a real pseudo-terminal (the stdlib `pty`), read with a deadline.
One pipeline serves every command: a group `rec` for journal replay, and two groups whose
dead letters (more than the store's old 1,000-row listing cap) are written through the
real dead-letter store before the pipeline starts, then replayed and handled.
"""

from __future__ import annotations

import fcntl
import json
import os
import pty
import re
import select
import signal
import struct
import subprocess
import sys
import termios
import time
from pathlib import Path

import pytest
from conftest import recorder_group
from recorder import read_handled

from nexus import Producer, config
from nexus.protocol.events import Event, encode, new_id
from nexus.router.deadletters import DeadLetterStore
from nexus.testing import wait_for

pytestmark = pytest.mark.system

ANSI = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]|\x1b\][^\x07]*\x07")
RATE = re.compile(r"[\d,.]+ ?[kMG]?B?/s|-/s")
ETA = re.compile(r"ETA (\d+:\d\d:\d\d|-:--:--)")
PROGRESS_MARKS = ("ETA", "/s", "━")  # what a progress line has and a result line has not

FIXED, LATER, ITEMS = 1_100, 120, 1_000


def nexus_argv(*args: str) -> list[str]:
    return [sys.executable, "-m", "nexus", *args]


class Terminal:
    """A command on a pseudo-terminal (stdout and stderr both on it, as in a shell)."""

    def __init__(self, argv: list[str]):
        master, slave = pty.openpty()
        fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 40, 160, 0, 0))
        env = {**os.environ, "TERM": "xterm-256color", "COLUMNS": "160", "LINES": "40"}
        env.pop("NO_COLOR", None)
        self.proc = subprocess.Popen(argv, stdin=slave, stdout=slave, stderr=slave, env=env, close_fds=True)
        os.close(slave)
        self.master = master
        self.raw = b""

    @property
    def text(self) -> str:
        return ANSI.sub("", self.raw.decode("utf-8", "replace")).replace("\r", "\n")

    def read_until(self, pattern: re.Pattern[str] | None, timeout: float) -> bool:
        """Read until `pattern` shows (True) or the command ended and its output is drained
        (then whether the pattern showed); fails the test at the deadline."""
        deadline = time.monotonic() + timeout
        while True:
            if pattern is not None and pattern.search(self.text):
                return True
            left = deadline - time.monotonic()
            assert left > 0, f"no {pattern.pattern if pattern else 'exit'} within {timeout}s; output:\n{self.text}"
            ready, _, _ = select.select([self.master], [], [], min(left, 0.5))
            if ready:
                try:
                    chunk = os.read(self.master, 65536)
                except OSError:  # EIO: the command ended and closed the terminal
                    chunk = b""
                if chunk:
                    self.raw += chunk
                    continue
                self.proc.wait(timeout=max(left, 1))
                return pattern is not None and bool(pattern.search(self.text))

    def finish(self, timeout: float = 60) -> tuple[int, str]:
        try:
            self.read_until(None, timeout)
            return self.proc.wait(timeout=timeout), self.text
        finally:
            os.close(self.master)
            if self.proc.poll() is None:
                self.proc.kill()
                self.proc.wait()


def on_terminal(*args: str, timeout: float = 60) -> tuple[int, str]:
    return Terminal(nexus_argv(*args)).finish(timeout)


def piped(*args: str, timeout: float = 60) -> subprocess.CompletedProcess:
    return subprocess.run(nexus_argv(*args), capture_output=True, text=True, timeout=timeout)


def assert_progress(text: str, count: str, unit: str) -> None:
    """The progress line's columns: `N/total unit`, a rate, an ETA."""
    assert re.search(rf"{re.escape(count)}/{re.escape(count)} ?{re.escape(unit)}", text), text
    assert RATE.search(text), text
    assert ETA.search(text), text


def assert_no_progress(text: str) -> None:
    for mark in PROGRESS_MARKS:
        assert mark not in text, f"progress output ({mark!r}) where none belongs:\n{text}"


def put_dead_letters(store: DeadLetterStore, group: str, type_: str, n: int) -> list[str]:
    ids = []
    for i in range(n):
        event_id = new_id()
        raw = encode(Event(type=type_, source="progress-test", payload={"i": i}, id=event_id, time=time.time()))
        store.put(
            group=group,
            event_id=event_id,
            type=type_,
            source="progress-test",
            seq=i + 1,
            partition=0,
            member=f"{group}-0",
            error_type="RuntimeError",
            error="the bug since fixed",
            traceback="",
            attempts=3,
            first_failed=time.time(),
            event=raw,
        )
        ids.append(event_id)
    return ids


def handled_ids(out: Path) -> list[str]:
    return [row[1] for row in read_handled(str(out))]


def lag(p, group: str):
    return p.router_status()["groups"][group]["lag"]


def test_long_commands_show_progress_on_a_terminal_only(config_factory, launched, tmp_path):
    outs = {g: tmp_path / g for g in ("rec", "fixed", "later")}
    workers = {
        "rec": recorder_group(outs["rec"], subscribe=["test.item"]),
        "fixed": recorder_group(outs["fixed"], subscribe=["test.fixed"]),
        "later": recorder_group(outs["later"], subscribe=["test.later"]),
    }
    path = config_factory(workers=workers)
    cfg = config.load(path)
    # dead letters of an earlier run, through the real store (the router opens this file)
    store = DeadLetterStore(os.path.join(cfg.data_dir, "dlq.sqlite3"))
    fixed_ids = put_dead_letters(store, "fixed", "test.fixed", FIXED)
    later_ids = put_dead_letters(store, "later", "test.later", LATER)
    store.close()
    p = launched(path)
    conf = str(path)

    with Producer(cfg.confirm, source="progress-test") as producer:
        for i in range(ITEMS):
            producer.send("test.item", {"i": i}, key=f"k{i % 13}")
        producer.flush(30)
    wait_for(lambda: len(handled_ids(outs["rec"])) == ITEMS and lag(p, "rec") == 0, 30, message="items handled")

    # -- dlq replay: --json on a terminal prints JSON only; --all pages through every row
    rc, text = on_terminal("dlq", "replay", "--group", "later", "--json", "-c", conf)
    assert rc == 0, text
    assert_no_progress(text)
    assert len(json.loads(text[text.index("{") :])["replayed"]) == LATER
    rc, text = on_terminal("dlq", "replay", "--all", "-c", conf)
    assert rc == 0, text
    assert f"replayed {FIXED} dead letter(s)" in text
    assert_progress(text, f"{FIXED:,}", "dead letters")
    wait_for(lambda: len(handled_ids(outs["fixed"])) >= FIXED, 30, message="every replayed dead letter handled")
    wait_for(lambda: len(handled_ids(outs["later"])) >= LATER, 30, message="the group's dead letters handled")
    assert sorted(handled_ids(outs["fixed"])) == sorted(fixed_ids)
    assert sorted(handled_ids(outs["later"])) == sorted(later_ids)
    left = json.loads(piped("dlq", "list", "--json", "-c", conf).stdout)
    assert left["dead_letters"] == [] and left["total"] == 0

    # -- journal replay: on a terminal it follows the group's lag down to 0
    rc, text = on_terminal("journal", "replay", "--group", "rec", "--from", "1", "-c", conf)
    assert rc == 0, text
    assert f"replaying from seq 1 ({ITEMS} events)" in text
    assert_progress(text, f"{ITEMS:,}", "events")
    assert lag(p, "rec") == 0  # it returned once the lag was 0
    wait_for(lambda: len(handled_ids(outs["rec"])) == 2 * ITEMS, 30, message="replay handled")
    # through a pipe, and with --json: the one result line, no following
    first_item = min(row[2] for row in read_handled(str(outs["rec"])))
    result = piped("journal", "replay", "--group", "rec", "--from", str(first_item + ITEMS - 10), "-c", conf)
    assert result.returncode == 0 and "replaying from seq" in result.stdout, result.stderr
    assert_no_progress(result.stdout + result.stderr)
    # (handled first: a rewind past events not yet handled would skip them)
    wait_for(lambda: len(handled_ids(outs["rec"])) == 2 * ITEMS + 10, 30, message="piped replay handled")
    rc, text = on_terminal(
        "journal", "replay", "--group", "rec", "--from", str(first_item + ITEMS - 5), "--json", "-c", conf
    )
    assert rc == 0, text
    assert_no_progress(text)
    assert json.loads(text[text.index("{") :])["group"] == "rec"
    wait_for(lambda: len(handled_ids(outs["rec"])) == 2 * ITEMS + 15, 30, message="short replays handled")

    # Ctrl-C stops following, exit 0; the replay goes on in the router
    assert piped("scale", "rec", "0", "-c", conf).returncode == 0
    wait_for(lambda: not p.router_status()["groups"]["rec"]["members"], 30, message="rec has no member")
    term = Terminal(nexus_argv("journal", "replay", "--group", "rec", "--from", "1", "-c", conf))
    assert term.read_until(re.compile(rf"(?<![\d,])0/{ITEMS:,} events"), 30)  # nothing handled: no member
    term.proc.send_signal(signal.SIGINT)
    rc, text = term.finish(30)
    assert rc == 0, text
    assert "the replay of group rec goes on in the router" in text
    assert piped("scale", "rec", "1", "-c", conf).returncode == 0
    wait_for(lambda: len(handled_ids(outs["rec"])) == 3 * ITEMS + 15, 30, message="the replay went on")

    # -- journal verify reads the files: progress in bytes on a terminal, none piped
    rc, text = on_terminal("journal", "verify", "-c", conf)
    assert rc == 0, text
    size = sum(f.stat().st_size for f in Path(cfg.data_dir, "journal").glob("*.seg"))
    assert re.search(r"[\d.]+ [kM]?B/[\d.]+ [kM]?B", text) and RATE.search(text) and ETA.search(text), text
    assert "records" in text and ": ok" in text
    result = piped("journal", "verify", "-c", conf)
    assert result.returncode == 0 and ": ok" in result.stdout, result.stderr
    assert_no_progress(result.stdout + result.stderr)
    print(
        f"PROGRESS-REPORT dead letters replayed {FIXED + LATER} (handled {len(handled_ids(outs['fixed']))}"
        f" + {len(handled_ids(outs['later']))}); journal events {ITEMS}, replay handled "
        f"{len(handled_ids(outs['rec'])) - ITEMS}; journal {size} bytes verified"
    )
