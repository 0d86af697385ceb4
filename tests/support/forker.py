"""A handler that forks: on its first event each member process starts three sleepers
and records their pids (options.out/forked-<pid>.txt):

- a child that stays in the member's process group,
- a grandchild orphaned at once (started in the background by a shell that exits),
- a child that calls setsid (its own session and process group).
"""

from __future__ import annotations

import os
import subprocess

from recorder import _record

_forked = False


def handle(event, ctx) -> None:
    global _forked
    if not _forked:
        _forked = True
        child = subprocess.Popen(["sleep", "600"])
        shell = subprocess.run(["sh", "-c", "sleep 600 >/dev/null 2>&1 & echo $!"], capture_output=True, text=True)
        session = subprocess.Popen(["sleep", "600"], start_new_session=True)
        pids = [child.pid, int(shell.stdout.strip()), session.pid]
        path = os.path.join(ctx.options["out"], f"forked-{os.getpid()}.txt")
        with open(path + ".tmp", "w") as f:
            f.write(" ".join(map(str, pids)))
        os.rename(path + ".tmp", path)
    _record(event, ctx, ctx.options["out"])
