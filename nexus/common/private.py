"""Private by default: the data dir and everything in it belong to the user who runs
the pipeline, and nobody else.

- `data_dir` and every folder in it 0700, every file 0600 (journal segments, cursors,
  dead-letter database and its -wal/-shm, state and status files, black boxes, locks),
  whatever the umask: files are created with an explicit mode, and Nexus's own
  processes also run with umask 077 (`set_umask`).
- ipc sockets 0600 (a socket's "rw" is the right to connect).
- `security.ipc_group: NAME` opens exactly the way to the sockets for that group:
  `data_dir` and `data_dir/run` become 0710 (search only: no listing, no reading) with
  that group, and the sockets 0660 with it. Every file stays 0600.
- The launcher refuses a data dir others can write (`check_data_dir`, one line, exit 3)
  and tightens one an older version left readable (`tighten`, one warning).
"""

from __future__ import annotations

import grp
import os
import stat

import structlog

from nexus.errors import ConfigError

log = structlog.get_logger("nexus.launch")

UMASK = 0o077
DIR_MODE = 0o700
FILE_MODE = 0o600
GROUP_DIR_MODE = 0o710  # the data dir and run/ with security.ipc_group: search only
USER_UMASK_ENV = "NEXUS_USER_UMASK"  # the umask the launcher was started with (members, producers get it back)

_socket_gid: int | None = None  # security.ipc_group's gid in this process (`use_group`)


def set_umask() -> int:
    """umask 077 for this process (and what it spawns); returns the previous one. The
    first call in a launcher keeps the user's umask in the environment for members."""
    previous = os.umask(UMASK)
    os.environ.setdefault(USER_UMASK_ENV, oct(previous))
    return previous


def restore_user_umask() -> None:
    """A member or a producer runs the user's code: files it writes follow the user's
    umask, as they would outside Nexus (what they write in the data dir has an
    explicit mode)."""
    try:
        os.umask(int(os.environ[USER_UMASK_ENV], 8))
    except (KeyError, ValueError):
        pass


def use_group(name: str | None) -> None:
    """security.ipc_group for the sockets this process binds (None: owner only)."""
    global _socket_gid
    _socket_gid = grp.getgrnam(name).gr_gid if name else None


def makedirs(path: str, mode: int = DIR_MODE) -> None:
    """os.makedirs where every folder it creates (parents too) gets `mode`."""
    path = os.path.abspath(path)
    if os.path.isdir(path):
        return
    parent = os.path.dirname(path)
    if parent != path:
        makedirs(parent, mode)
    try:
        os.mkdir(path, mode)
    except FileExistsError:
        return
    os.chmod(path, mode)  # mkdir's mode passes through the umask; this one does not


def create(path: str, flags: int = os.O_WRONLY | os.O_CREAT | os.O_TRUNC) -> int:
    """os.open for a new file of ours: 0600 even when it already existed looser."""
    fd = os.open(path, flags | os.O_CLOEXEC, FILE_MODE)
    try:
        if stat.S_IMODE(os.fstat(fd).st_mode) != FILE_MODE:
            os.fchmod(fd, FILE_MODE)
    except OSError:
        os.close(fd)
        raise
    return fd


def restrict_socket(path: str) -> None:
    """A freshly bound ipc socket: the owner's alone, or its group's with ipc_group."""
    if _socket_gid is None:
        os.chmod(path, 0o600)
    else:
        os.chown(path, -1, _socket_gid)
        os.chmod(path, 0o660)


# -- the launcher's checks ---------------------------------------------------------------
def _mode(st: os.stat_result) -> str:
    return f"{stat.S_IMODE(st.st_mode):04o}"


def check_data_dir(data_dir: str, group: str | None) -> None:
    """Refuse (ConfigError, exit 3) a data dir someone else could write: another owner,
    group- or world-writable (group-writable is fine for security.ipc_group). Changes
    nothing; a missing data dir is created private later."""
    try:
        st = os.stat(data_dir)
    except FileNotFoundError:
        return
    except OSError as exc:
        raise ConfigError(f"data_dir {data_dir}: {exc.strerror}") from None
    if not stat.S_ISDIR(st.st_mode):
        raise ConfigError(f"data_dir {data_dir} is not a directory")
    if st.st_uid != os.geteuid():
        raise ConfigError(
            f"data_dir {data_dir} belongs to uid {st.st_uid}, not to this user (uid {os.geteuid()}); "
            "run as its owner or use another data_dir"
        )
    gid = grp.getgrnam(group).gr_gid if group else None
    group_ok = gid is not None and st.st_gid == gid
    if st.st_mode & stat.S_IWOTH or (st.st_mode & stat.S_IWGRP and not group_ok):
        raise ConfigError(
            f"data_dir {data_dir} is writable by others (mode {_mode(st)}): "
            f"make it private first (chmod 700 {data_dir})"
        )


def tighten(data_dir: str, group: str | None) -> int:
    """Bring an existing data dir to the modes above (an older version made it 0755 and
    its files 0644): folders 0700, files 0600, and the group's way to the sockets. One
    warning names the data dir and how many entries changed; returns that number."""
    gid = grp.getgrnam(group).gr_gid if group else None
    makedirs(data_dir)
    run = os.path.join(data_dir, "run")
    if gid is not None:
        makedirs(run)
    changed: list[str] = []

    def fix(path: str, mode: int, st: os.stat_result, want_gid: int | None = None) -> None:
        if want_gid is not None and st.st_gid != want_gid:
            os.chown(path, -1, want_gid)
        if stat.S_IMODE(st.st_mode) != mode:
            os.chmod(path, mode)
            changed.append(f"{os.path.relpath(path, data_dir)} {_mode(st)}")

    for top, _dirs, files in os.walk(data_dir):
        st = os.lstat(top)
        opened = gid is not None and top in (data_dir, run)
        fix(top, GROUP_DIR_MODE if opened else DIR_MODE, st, gid if opened else None)
        for name in files:  # os.walk lists symlinks to dirs among dirs and does not follow them
            path = os.path.join(top, name)
            st = os.lstat(path)
            if stat.S_ISREG(st.st_mode):  # not symlinks (their target is not ours to change), not sockets
                fix(path, FILE_MODE, st)
    if changed:
        log.warning(
            "data_dir_permissions_tightened",
            path=data_dir,
            entries=len(changed),
            examples=changed[:5],
            now="folders 0700, files 0600",
        )
    return len(changed)
