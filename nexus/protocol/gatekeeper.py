"""Who may connect over CURVE, and what each key may do.

`KeyRing` reads the authorized keys folder: `NAME.key` (the client's public key, as
`nexus keys generate` writes it) and `NAME.yaml` beside it (its role and limits; a key
without one is not loaded: fail closed). `Gatekeeper` is the ZAP handler (pyzmq's
ThreadAuthenticator with a key callback, so the folder is re-read without a restart),
names each admitted connection by its key (the messages' `User-Id`), and counts the
handshakes it refused by reason, read from socket monitors.

The folder is re-scanned every RESCAN_EVERY (a stat of its files) rather than watched
with inotify: one code path that works on every filesystem (NFS, bind mounts) and in
the owner's loop thread, so the key set changes between two messages, never during one.
"""

from __future__ import annotations

import collections
import errno
import os
import re
import stat
import time
from dataclasses import dataclass, field
from fnmatch import fnmatchcase
from typing import Literal

import msgspec
import structlog
import yaml
import zmq
import zmq.auth
from zmq.auth.thread import ThreadAuthenticator
from zmq.utils.monitor import parse_monitor_message

from nexus.config import Strict
from nexus.errors import ConfigError
from nexus.protocol.curve import ZAP_DOMAIN, KeyPair, fingerprint

log = structlog.get_logger("nexus.security")

RESCAN_EVERY = 1.0  # seconds between two looks at the authorized keys folder
LOG_EVERY = 10.0  # seconds: at most one refusal line per reason this often
LOCAL = "local"  # the name of the server's own key (the router host's processes)
NAME_RE = re.compile(r"[A-Za-z0-9_.-]{1,64}")
_SEND_CACHE = 10_000  # (source, type) answers remembered per key

# Handshake failures a CURVE server sees, by the monitor event's value. A peer that hung
# up during the handshake is "incomplete": a port scan, the CLI's reachability probe
# (transport.unreachable), and also a NULL client when it read our CURVE greeting and
# closed before we read its own (a race: libzmq cannot tell it from the others then).
_REFUSALS: dict[int, str] = {
    int(zmq.PROTOCOL_ERROR_ZMTP_MECHANISM_MISMATCH): "null_client",  # a client without CURVE
    int(zmq.PROTOCOL_ERROR_ZMTP_CRYPTOGRAPHIC): "wrong_server_key",  # its HELLO is not for our key
}
_MONITORED = (
    zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL | zmq.EVENT_HANDSHAKE_FAILED_AUTH | zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL
)
_CONNECTIONS = zmq.EVENT_ACCEPTED | zmq.EVENT_DISCONNECTED  # counted (the producers-connected metric)


class GrantFile(Strict):
    """NAME.yaml: what the key NAME may do."""

    role: Literal["producer", "member", "admin"]
    sources: list[str] = []  # globs of the event sources it may send
    types: list[str] = []  # globs of the event types it may send
    groups: list[str] = []  # worker groups it may join (and fetch, and receive)


@dataclass
class Grant:
    name: str
    public: bytes
    role: str
    sources: list[str] = field(default_factory=list)
    types: list[str] = field(default_factory=list)
    groups: list[str] = field(default_factory=list)
    _sends: dict[tuple[str, str], bool] = field(default_factory=dict, repr=False)

    @property
    def admin(self) -> bool:
        return self.role == "admin"

    def may_send(self, source: str, type_: str) -> bool:
        if self.role == "admin":
            return True
        found = self._sends.get((source, type_))
        if found is None:
            found = any(fnmatchcase(source, g) for g in self.sources) and any(fnmatchcase(type_, g) for g in self.types)
            if len(self._sends) >= _SEND_CACHE:
                self._sends.clear()
            self._sends[(source, type_)] = found
        return found

    def may_join(self, group: str) -> bool:
        return self.role == "admin" or any(fnmatchcase(group, g) for g in self.groups)

    def describe(self) -> dict:
        return {
            "name": self.name,
            "key": self.public.decode(),
            "role": self.role,
            "sources": self.sources,
            "types": self.types,
            "groups": self.groups,
        }


def read_grant(folder: str, name: str) -> Grant:
    """NAME.key and NAME.yaml of `folder`; ValueError with a one-line reason."""
    public, _ = zmq.auth.load_certificate(os.path.join(folder, f"{name}.key"))
    path = os.path.join(folder, f"{name}.yaml")
    try:
        with open(path) as f:
            data = yaml.safe_load(f)
    except FileNotFoundError:
        raise ValueError(f"no {name}.yaml beside {name}.key (its role and limits)") from None
    except (OSError, yaml.YAMLError) as exc:
        raise ValueError(f"cannot read {name}.yaml: {exc}") from None
    try:
        spec = msgspec.convert(data, GrantFile)
    except msgspec.ValidationError as exc:
        raise ValueError(f"{name}.yaml: {exc}") from None
    return Grant(name, public, spec.role, list(spec.sources), list(spec.types), list(spec.groups))


# a read that fails for these reasons says nothing about the keys (out of file
# descriptors, memory, an I/O hiccup): the key set stays as it was, never "all revoked"
TRANSIENT = {errno.EMFILE, errno.ENFILE, errno.ENOMEM, errno.EIO, errno.EAGAIN, errno.EINTR}


class FolderUnreadable(Exception):
    """The folder could not be read for a passing reason; try again later."""


def check_folder(folder: str) -> None:
    """The folder grants access (an admin key dropped in is admitted within a second):
    refused unless it is ours and only we can write it. A missing folder is fine (no
    keys yet); ConfigError, one line, otherwise."""
    try:
        st = os.stat(folder)
    except FileNotFoundError:
        return
    except OSError as exc:
        raise ConfigError(f"security.curve.authorized_keys_dir: cannot read {folder}: {exc.strerror}") from None
    if st.st_uid != os.geteuid() or st.st_mode & 0o022:
        raise ConfigError(
            f"security.curve.authorized_keys_dir: {folder} is writable by others (mode {st.st_mode & 0o777:04o}, "
            f"owner uid {st.st_uid}): anyone who can write it can authorize a key (chmod 700 {folder})"
        )


def _own_file(folder: str, filename: str) -> None:
    """A key or grant file must be a plain file of ours that only we can write."""
    st = os.lstat(os.path.join(folder, filename))
    if not stat.S_ISREG(st.st_mode) or st.st_uid != os.geteuid() or st.st_mode & 0o022:
        raise ValueError(f"{filename}: not a plain file of this user that only it can write: ignored")


def read_folder(folder: str) -> tuple[list[Grant], dict[str, str]]:
    """Every usable key of `folder`, and why each other .key file is not usable.
    Raises FolderUnreadable for a passing read error (see TRANSIENT)."""
    grants, problems = [], {}
    try:
        names = sorted(f[: -len(".key")] for f in os.listdir(folder) if f.endswith(".key"))
    except OSError as exc:
        if exc.errno in TRANSIENT:
            raise FolderUnreadable(f"cannot read {folder}: {exc.strerror}") from None
        return [], {"": f"cannot read {folder}: {exc.strerror}"}
    for name in names:
        if not NAME_RE.fullmatch(name) or name == LOCAL:
            problems[name] = f"{name!r} is not a usable key name (letters, digits, '.', '-', '_'; not {LOCAL!r})"
            continue
        try:
            _own_file(folder, f"{name}.key")
            if os.path.lexists(os.path.join(folder, f"{name}.yaml")):
                _own_file(folder, f"{name}.yaml")
            grants.append(read_grant(folder, name))
        except OSError as exc:
            if exc.errno in TRANSIENT:
                raise FolderUnreadable(f"cannot read {name}.key: {exc.strerror}") from None
            problems[name] = str(exc)
        except ValueError as exc:
            problems[name] = str(exc)
    return grants, problems


class KeyRing:
    """The authorized keys of a folder, by public key and by name; the server's own key
    is `local`, an admin (the processes of the router host use it)."""

    def __init__(self, folder: str, own: KeyPair):
        check_folder(folder)
        self.folder = folder
        self.own = Grant(LOCAL, own.public, "admin")
        self.by_key: dict[bytes, Grant] = {}
        self.by_name: dict[str, Grant] = {}
        self._signature: tuple | None = None
        self._problems: dict[str, str] = {}

    def _look(self) -> tuple:
        try:
            with os.scandir(self.folder) as it:
                return tuple(
                    sorted(
                        (e.name, e.stat().st_mtime_ns, e.stat().st_size)
                        for e in it
                        if e.name.endswith((".key", ".yaml"))
                    )
                )
        except OSError as exc:
            return (("", exc.errno),)

    def scan(self) -> set[str]:
        """Re-read the folder if anything in it changed; the names whose access ended or
        changed (their connections are to be closed)."""
        signature = self._look()
        if signature == self._signature:
            return set()
        try:
            if signature and signature[0][0] == "" and signature[0][1] in TRANSIENT:
                raise FolderUnreadable(f"cannot read {self.folder}: {os.strerror(signature[0][1])}")
            grants, problems = read_folder(self.folder)
        except FolderUnreadable as exc:
            # keep every key as it is and read again at the next scan (the signature is
            # left as it was): a full fd table must not revoke every client at once
            if self._problems.get("") != str(exc):
                log.error("keys_folder_unreadable", folder=self.folder, reason=str(exc), kept=len(self.by_name))
            self._problems = {**self._problems, "": str(exc)}
            return set()
        self._signature = signature
        by_name = {LOCAL: self.own, **{g.name: g for g in grants}}
        by_key: dict[bytes, Grant] = {}
        for g in by_name.values():
            by_key.setdefault(g.public, g)  # (a second name for one key adds nothing)
        changed = {
            name
            for name, old in self.by_name.items()
            if (new := by_name.get(name)) is None or new.describe() != old.describe()
        }
        for name, why in problems.items():
            if self._problems.get(name) != why:
                log.error("key_unusable", folder=self.folder, name=name, reason=why)
        self._problems = problems
        self.by_key, self.by_name = by_key, by_name  # swapped whole: the ZAP thread reads them
        log.info(
            "keys_loaded", folder=self.folder, keys=sorted(n for n in by_name if n != LOCAL), revoked=sorted(changed)
        )
        return changed


class _Zap(ThreadAuthenticator):
    """pyzmq's ZAP thread; the User-Id of an admitted connection is its key's name."""

    def __init__(self, ctx: zmq.Context, keys: KeyRing):
        super().__init__(ctx)
        self.keys = keys

    def curve_user_id(self, client_public_key: bytes) -> str:
        grant = self.keys.by_key.get(zmq.utils.z85.encode(client_public_key))
        return grant.name if grant is not None else ""


class Gatekeeper:
    """The ZAP handler of one context, the refusal counts of its CURVE sockets."""

    def __init__(self, ctx: zmq.Context, keys: KeyRing):
        self.keys = keys
        self.refused: collections.Counter[str] = collections.Counter()  # handshakes, by reason
        self.forbidden: collections.Counter[str] = collections.Counter()  # requests, by what was asked
        self._zap = _Zap(ctx, keys)
        self._monitors: dict[zmq.Socket, zmq.Socket] = {}
        self.connections: dict[zmq.Socket, int] = {}  # per watched socket: peers connected now
        self._unknown: collections.deque[str] = collections.deque(maxlen=16)  # fingerprints (ZAP thread)
        self._next_scan = 0.0
        self._logged: dict[str, tuple[float, int]] = {}  # reason -> (last line, count then)

    def start(self) -> Gatekeeper:
        self.keys.scan()
        self._next_scan = time.monotonic() + RESCAN_EVERY
        self._zap.start()
        self._zap.configure_curve_callback(ZAP_DOMAIN.decode(), self)
        return self

    def stop(self) -> None:
        for mon in self._monitors.values():
            mon.close(0)
        self._monitors.clear()
        self._zap.stop()

    # called by pyzmq in the ZAP thread, per handshake
    def callback(self, domain: str, key: bytes) -> bool:  # noqa: ARG002 - one domain
        if key in self.keys.by_key:
            return True
        self._unknown.append(fingerprint(key))
        return False

    def watch(self, sock: zmq.Socket) -> None:
        """Count the handshakes `sock` refuses (call after the bind)."""
        self._monitors[sock] = sock.get_monitor_socket(_MONITORED | _CONNECTIONS)
        self.connections[sock] = 0

    def forget(self, sock: zmq.Socket) -> None:
        """Before `sock` is closed."""
        mon = self._monitors.pop(sock, None)
        self.connections.pop(sock, None)
        if mon is not None:
            sock.disable_monitor()
            mon.close(0)

    def grant(self, frame: zmq.Frame) -> Grant | None:
        """The key a message came with, None when it is no longer authorized."""
        try:
            name = frame.get("User-Id")
        except zmq.ZMQError:  # not over CURVE
            return None
        return self.keys.by_name.get(name)  # type: ignore[arg-type]

    def tick(self, now: float) -> set[str]:
        """From the owner's loop: count refusals, log them (rate-limited), re-scan the
        folder when due. The names revoked since the last scan."""
        for sock, mon in self._monitors.items():
            for _ in range(1000):
                try:
                    event = parse_monitor_message(mon.recv_multipart(zmq.NOBLOCK))
                except zmq.Again:
                    break
                if event["event"] == zmq.EVENT_ACCEPTED:
                    self.connections[sock] += 1
                    continue
                if event["event"] == zmq.EVENT_DISCONNECTED:
                    self.connections[sock] = max(self.connections[sock] - 1, 0)
                    continue
                if event["event"] == zmq.EVENT_HANDSHAKE_FAILED_AUTH:
                    reason = "unknown_key"
                elif event["event"] == zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL:
                    reason = "incomplete"
                else:
                    reason = _REFUSALS.get(int(event["value"]), "handshake_failed")
                self.refused[reason] += 1
        self._log_refusals(now)
        if now < self._next_scan:
            return set()
        self._next_scan = now + RESCAN_EVERY
        return self.keys.scan()

    def _log_refusals(self, now: float) -> None:
        for reason, count in self.refused.items():
            last, logged = self._logged.get(reason, (0.0, 0))
            if count > logged and now - last >= LOG_EVERY:
                self._logged[reason] = (now, count)
                extra = {"keys": sorted(set(self._unknown))} if reason == "unknown_key" else {}
                log.warning("curve_refused", reason=reason, count=count - logged, total=count, **extra)

    def status(self) -> dict:
        return {
            "curve": True,
            "authorized_keys": len(self.keys.by_name) - 1,
            "refused": dict(self.refused),
            "forbidden": dict(self.forbidden),
        }
