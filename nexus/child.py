"""Entry point of every process the launcher starts (spawn start method)."""
from __future__ import annotations

import os
import sys

from .errors import ExitCode, NexusError
from .process import die_with_parent


def entry(role: str, config_path: str, env: str | None, name: str, group: str, parent_pid: int) -> None:
    die_with_parent(parent_pid)
    # Own process group: a terminal's Ctrl-C (or `timeout`) signals the launcher only,
    # which then stops children in order instead of all at once.
    os.setpgrp()
    from . import blackbox, config as config_mod, logs
    try:
        cfg = config_mod.load(config_path, env)
        logs.configure(cfg.log.level, cfg.log.format, process=name)
        _open_box(blackbox, blackbox.path_for(cfg.data_dir, name))
        if role == "router":
            from .router import main
            main(cfg, env)
        elif role == "producer":
            from .producers import main
            main(cfg, name)
        elif role == "worker":
            from .worker import main
            main(cfg, group, name)
        else:
            raise NexusError(f"unknown role {role}")
    except NexusError as exc:
        print(f"nexus {role} {name}: {exc}", file=sys.stderr, flush=True)
        sys.exit(int(exc.exit_code))
    except KeyboardInterrupt:
        sys.exit(int(ExitCode.OK))


def _open_box(blackbox, path: str) -> None:
    """Map the box the launcher made for this child; without one, run without."""
    try:
        box = blackbox.BlackBox.open(path)
    except (OSError, ValueError):
        return
    box.started()
    blackbox.install(box)
