"""Entry point of every process the launcher starts (spawn start method).

The child runs on the config the launcher validated and hands over (`config`), never
on whatever the file on disk says when it (re)starts: an edit takes effect only
through `nexus reload`.
"""

from __future__ import annotations

import os
import sys

from nexus import config as config_mod
from nexus.common.process import RUN_ENV, die_with_parent, stop_own_group
from nexus.errors import ExitCode, NexusError


def entry(
    role: str, config, env: str | None, name: str, group: str, parent_pid: int, members_alive: bool = False
) -> None:
    die_with_parent(parent_pid)
    # Own process group: a terminal's Ctrl-C (or `timeout`) signals the launcher only,
    # which then stops children in order instead of all at once; and whatever this
    # child forks stays in the group, so the launcher can end it after we exit.
    os.setpgrp()
    from nexus.common import blackbox, logs, private, redact

    # files: private (umask 077, as in the launcher); members and producers run the
    # user's code (handlers, source plugins, the file source's watched folders), whose
    # files follow the umask the user started the launcher with: every file of ours
    # there is made with an explicit mode (nexus/common/private.py)
    if role in ("worker", "producer"):
        private.restore_user_umask()
    else:
        private.set_umask()
    code = ExitCode.OK
    try:
        cfg = config
        redact.register_from(cfg)  # the secrets this process holds: no line may show them
        private.use_group(cfg.security.ipc_group)
        config_mod.add_module_paths(cfg)  # handlers and contracts: see config.module_paths
        logs.configure(cfg.log.level, cfg.log.format, process=name)
        # a reload's new log level: re-read from the launcher's file on LEVEL_SIGNAL
        logs.follow_level_file(cfg.data_dir, os.environ.get(RUN_ENV, ""))
        _open_box(blackbox, blackbox.path_for(cfg.data_dir, name))
        if role == "router" and cfg.engine == "nats":  # the engine's ingest takes the router's place
            from nexus.jsingest.process import main as run_ingest

            run_ingest(cfg, env, members_alive, launcher_pid=parent_pid)
        elif role == "router":
            from nexus.router.server import main as run_router

            run_router(cfg, env, members_alive, launcher_pid=parent_pid)
        elif role == "producer":
            from nexus.sources import main as run_source

            run_source(cfg, name)
        elif role == "worker":
            run_member = member_main(cfg)
            run_member(cfg, group, name)
        elif role == "http":
            from nexus.http.server import main as run_http

            run_http(cfg, name)
        elif role == "gateway":
            from nexus.gateway.server import main as run_gateway

            run_gateway(cfg, name)
        else:
            raise NexusError(f"unknown role {role}")
    except NexusError as exc:
        code = exc.exit_code
        # a config error: the launcher logs the line once and shows it in `nexus status`
        text = redact.scrub(str(exc))
        if code != ExitCode.CONFIG or not blackbox.leave_reason(config.data_dir, name, text):
            print(f"nexus {role} {name}: {text}", file=sys.stderr, flush=True)
    except KeyboardInterrupt:
        code = ExitCode.OK
    # a graceful end: what a handler forked goes with us (SIGTERM, then SIGKILL)
    stop_own_group(grace=2.0)
    sys.exit(int(code))


def member_main(cfg):
    """The member runtime of the config's engine (`nexus worker` runs it too)."""
    if cfg.engine == "nats":
        from nexus.jsmember.runtime import main as run_nats_member

        return run_nats_member
    from nexus.member.runtime import main as run_member

    return run_member


def _open_box(blackbox, path: str) -> None:
    """Map the box the launcher made for this child; without one, run without."""
    try:
        box = blackbox.BlackBox.open(path)
    except (OSError, ValueError):
        return
    box.started()
    blackbox.install(box)
