"""The console Toasty server (`python -m nexus.tools.toasty`) in a subprocess, for tests."""

from __future__ import annotations

import json
import queue
import signal
import subprocess
import sys
import threading
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
DEADLINE = 10.0


class ToastyProcess:
    """The console server in a subprocess; its stdout lines arrive on a queue."""

    def __init__(self, *args: str, port: int = 0):
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "nexus.tools.toasty", "--listen", f"127.0.0.1:{port}", "--json", *args],
            cwd=REPO,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        self.lines: queue.Queue[str | None] = queue.Queue()
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()
        first = self.next_line()
        assert first.startswith("toasty listening on 127.0.0.1:"), first
        self.port = int(first.rsplit(":", 1)[1])
        self.target = f"127.0.0.1:{self.port}"

    def _read(self) -> None:
        for line in self.proc.stdout:
            self.lines.put(line.rstrip("\n"))
        self.lines.put(None)  # EOF

    def next_line(self, timeout: float = DEADLINE) -> str:
        try:
            line = self.lines.get(timeout=timeout)
        except queue.Empty:
            raise TimeoutError(f"no line from toasty within {timeout}s") from None
        if line is None:
            raise AssertionError(f"toasty exited: rc={self.proc.poll()} stderr={self.proc.stderr.read()}")
        return line

    def next_notification(self) -> dict:
        return json.loads(self.next_line())

    def stop(self) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(DEADLINE)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(DEADLINE)
        self._reader.join(DEADLINE)
        self.proc.stdout.close()
        self.proc.stderr.close()
        return self.proc.returncode
