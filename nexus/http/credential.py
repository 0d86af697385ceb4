"""The HTTP port's token: `http.token` when the config sets one, else one the launcher
generates once in the data dir (`{data_dir}/http.token`, 0600) and keeps across
restarts, so a Prometheus `credentials_file` or a bookmarked dashboard link stays good.

Without it, any local user could read every event payload (the dashboard's tail) and
replay or purge dead letters through the loopback port, although the data dir, the
sockets and the CLI are the pipeline user's alone. Reading the file takes the same
privilege as every other CLI command: access to the data dir (`nexus dashboard`).
"""

from __future__ import annotations

import os
import re
import secrets

import structlog

from nexus.common import private, redact
from nexus.config import Config
from nexus.errors import ConfigError
from nexus.http.listen import local_url

log = structlog.get_logger("nexus.launch")

FILE = "http.token"
_VALID = re.compile(r"[A-Za-z0-9_-]{32,200}")  # what token_urlsafe makes; anything else is made again


def path_of(cfg: Config) -> str:
    return os.path.join(cfg.data_dir, FILE)


def _read(path: str) -> str | None:
    """The stored token; None when absent or not one (a write cut short)."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except FileNotFoundError:
        return None
    with os.fdopen(fd, "rb") as f:
        text = f.read(256).decode("ascii", "replace").strip()
    return text if _VALID.fullmatch(text) else None


def ensure(cfg: Config) -> str:
    """The launcher, once the data dir is locked: the token the HTTP port will want,
    generated and stored now when the config has none and the data dir has none yet."""
    if cfg.http.token:
        return cfg.http.token
    path = path_of(cfg)
    try:
        token = _read(path)
    except OSError as exc:  # e.g. a symlink put there (O_NOFOLLOW)
        raise ConfigError(f"cannot read the HTTP token {path}: {exc.strerror or exc}") from None
    if token is None:
        token = secrets.token_urlsafe(32)
        tmp = f"{path}.tmp"
        try:
            fd = private.create(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW)
            with os.fdopen(fd, "w") as f:
                f.write(token + "\n")
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)  # never a half-written token under the real name
        except OSError as exc:
            raise ConfigError(f"cannot write the HTTP token {path}: {exc.strerror or exc}") from None
    return token


def load(cfg: Config) -> str:
    """The HTTP process and `nexus dashboard`: the token in force. One line (ConfigError)
    when it cannot be read: no pipeline has started on this data dir yet, or it is
    another user's."""
    if cfg.http.token:
        return cfg.http.token
    path = path_of(cfg)
    try:
        token = _read(path)
    except OSError as exc:
        raise ConfigError(f"cannot read the HTTP token {path}: {exc.strerror or exc}") from None
    if token is None:
        raise ConfigError(f"no HTTP token in {path} yet: the launcher makes it when it starts (http.token unset)")
    return token


def prepare(cfg: Config) -> None:
    """The launcher's hook at start: the token exists before the HTTP process does, and
    the log says where the dashboard is and how to get its link (never the token)."""
    redact.register(ensure(cfg))
    log.info(
        "dashboard",
        url=local_url(cfg.http.listen),
        link="run `nexus dashboard` for the address with its token",
        token="http.token" if cfg.http.token else path_of(cfg),
    )
