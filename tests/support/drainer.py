"""A stand-in child for launcher unit tests: runs until SIGTERM, then "drains" for
`DRAIN` seconds before it exits 0, like a member finishing and acking in-flight events.
It marks itself ready with the file DATA_DIR/NAME.PID.ready (the groups and handlers of
the config it was handed, as JSON)."""

from __future__ import annotations

import json
import os
import signal
import threading

DRAIN = 0.5


def entry(role, config, env, name, group, parent_pid, members_alive=False) -> None:  # noqa: ARG001
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    with open(os.path.join(config.data_dir, f"{name}.{os.getpid()}.ready"), "w") as f:
        # SIGTERM now drains (before this it would end the process at once); the file
        # says which config it was handed: each group's handler
        json.dump({g: spec.handler for g, spec in config.workers.items()}, f)
    stop.wait(120)  # bounded: an orphaned test child ends by itself
    stop.clear()
    stop.wait(DRAIN)  # the drain: still alive this long after SIGTERM
