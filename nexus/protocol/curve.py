"""CURVE keys for the sockets transport.py makes, from the config or the environment.

A server (the router, the launcher) has its own key pair and a folder of authorized
client keys; a client (the SDK, a member, a source, the CLI) has its own key pair and
the server's public key. Keys are z85 certificate files as `nexus keys generate`
(pyzmq's zmq.auth.create_certificates) writes them. CURVE applies to tcp:// endpoints
only: ipc:// ones are guarded by file permissions.

On the router host a config with `secret_key_file` and `authorized_keys_dir` makes the
launched processes (sources, members, the CLI) clients with the router's own key pair:
nothing else to configure there.
"""

from __future__ import annotations

import ipaddress
import os
from dataclasses import dataclass

import structlog
import zmq
import zmq.auth

from nexus.common import redact
from nexus.config import Config, CurveConfig
from nexus.errors import ConfigError

ENV_SECRET_KEY_FILE = "NEXUS_CURVE_SECRET_KEY_FILE"  # a client's own key pair
ENV_SERVER_KEY = "NEXUS_CURVE_SERVER_KEY"  # the router's public key: z85 text or a .key file
ZAP_DOMAIN = b"nexus"  # every CURVE server socket's ZAP domain (enforced)

log = structlog.get_logger("nexus.security")


@dataclass(frozen=True)
class KeyPair:
    public: bytes  # z85, 40 characters
    secret: bytes = b""

    @property
    def fingerprint(self) -> str:
        """What logs and status show of a key: never more than this."""
        return fingerprint(self.public)


@dataclass(frozen=True)
class ServerKeys:
    pair: KeyPair


@dataclass(frozen=True)
class ClientKeys:
    pair: KeyPair
    server: bytes  # the server's public key, z85


def fingerprint(public: bytes) -> str:
    return public[:8].decode("ascii", "replace")


def _z85_key(text: bytes) -> bool:
    if len(text) != 40:
        return False
    try:
        return len(zmq.utils.z85.decode(text)) == 32
    except (ValueError, KeyError):
        return False


def load_pair(path: str, what: str) -> KeyPair:
    """A key pair from a .key_secret file; ConfigError naming `what` and the file.
    A secret file others can read is refused (fail closed): its key is no secret."""
    try:
        mode = os.stat(path).st_mode & 0o777
    except OSError as exc:
        raise ConfigError(f"{what}: cannot read key file {path}: {exc.strerror}") from None
    if mode & 0o077:
        raise ConfigError(f"{what}: {path} is readable by others (mode {mode:04o}): chmod 600 {path}")
    try:
        public, secret = zmq.auth.load_certificate(path)
    except (OSError, ValueError) as exc:
        raise ConfigError(f"{what}: cannot read key file {path}: {exc}") from None
    if not secret or not _z85_key(public) or not _z85_key(secret):
        raise ConfigError(f"{what}: {path} holds no secret key (use the .key_secret file `nexus keys generate` wrote)")
    redact.register(secret.decode("ascii"))  # the shared rule: no text this process writes shows it
    return KeyPair(public, secret)


def load_public(value: str, what: str) -> bytes:
    """A public key: a .key (or .key_secret) file, or the z85 text itself."""
    if os.path.exists(value):
        try:
            public, _ = zmq.auth.load_certificate(value)
        except (OSError, ValueError) as exc:
            raise ConfigError(f"{what}: cannot read key file {value}: {exc}") from None
        if _z85_key(public):
            return public
        raise ConfigError(f"{what}: {value} holds no valid public key")
    if _z85_key(value.encode("ascii", "replace")):
        return value.encode("ascii")
    raise ConfigError(f"{what}: neither a key file nor a 40-character z85 public key")


def server_keys(cfg: Config) -> ServerKeys | None:
    """The router's and launcher's keys, or None when CURVE is off (no authorized_keys_dir)."""
    curve = cfg.security.curve
    if not curve.authorized_keys_dir:
        return None
    return ServerKeys(load_pair(cfg.resolve(curve.secret_key_file), "security.curve.secret_key_file"))


def authorized_keys_dir(cfg: Config) -> str:
    return cfg.resolve(cfg.security.curve.authorized_keys_dir) if cfg.security.curve.authorized_keys_dir else ""


def client_keys(cfg: Config | None = None) -> ClientKeys | None:
    """A client's keys: the config's, else the environment's; None when neither names a
    secret key file (CURVE off: NULL sockets, as before)."""
    curve = cfg.security.curve if cfg is not None else CurveConfig()
    resolve = cfg.resolve if cfg is not None else os.path.abspath
    if curve.secret_key_file:
        pair = load_pair(resolve(curve.secret_key_file), "security.curve.secret_key_file")
    elif os.environ.get(ENV_SECRET_KEY_FILE):
        pair = load_pair(os.environ[ENV_SECRET_KEY_FILE], ENV_SECRET_KEY_FILE)
    else:
        return None
    if curve.server_key:
        value = curve.server_key
        if not _z85_key(value.encode("ascii", "replace")):
            value = resolve(value)
        server = load_public(value, "security.curve.server_key")
    elif os.environ.get(ENV_SERVER_KEY):
        server = load_public(os.environ[ENV_SERVER_KEY], ENV_SERVER_KEY)
    elif curve.authorized_keys_dir:
        server = pair.public  # the router host: its own processes use the router's key pair
    else:
        raise ConfigError(
            f"security.curve.server_key (or {ENV_SERVER_KEY}): required with a secret key file "
            "(the router's public key: its .key file or z85 text)"
        )
    return ClientKeys(pair, server)


# -- sockets -------------------------------------------------------------------------
HANDSHAKE_MS = 5000  # generous for a slow link (the handshake is 4 small messages)


def serve(sock: zmq.Socket, keys: ServerKeys) -> None:
    """CURVE server options; ZAP with the domain enforced, so without a ZAP handler
    (nexus/protocol/gatekeeper.py) in the socket's context every client is refused."""
    sock.setsockopt(zmq.CURVE_SERVER, 1)
    sock.setsockopt(zmq.CURVE_SECRETKEY, keys.pair.secret)
    sock.setsockopt(zmq.CURVE_PUBLICKEY, keys.pair.public)
    sock.setsockopt(zmq.ZAP_DOMAIN, ZAP_DOMAIN)
    sock.setsockopt(zmq.ZAP_ENFORCE_DOMAIN, 1)
    # a connection that has not finished its handshake by then is dropped (libzmq's
    # default is 30 s: idle connections from a peer without a key would pin fds)
    sock.setsockopt(zmq.HANDSHAKE_IVL, HANDSHAKE_MS)


def dial(sock: zmq.Socket, keys: ClientKeys) -> None:
    sock.setsockopt(zmq.CURVE_SERVERKEY, keys.server)
    sock.setsockopt(zmq.CURVE_PUBLICKEY, keys.pair.public)
    sock.setsockopt(zmq.CURVE_SECRETKEY, keys.pair.secret)


# -- fail closed ---------------------------------------------------------------------
def is_loopback(endpoint: str) -> bool:
    """A tcp:// endpoint only this host can reach (127.0.0.0/8, ::1, localhost)."""
    host = endpoint[len("tcp://") :].rpartition(":")[0].strip("[]")
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False  # *, an interface name, a host name: other hosts may reach it


def exposed(endpoints: dict[str, str]) -> list[str]:
    """Labels of the tcp:// endpoints other hosts may reach."""
    return [label for label, e in endpoints.items() if e.startswith("tcp://") and not is_loopback(e)]


def server_endpoints(cfg: Config) -> dict[str, str]:
    return {
        "router.ingest": cfg.ingest,
        "router.confirm": cfg.confirm,
        "router.publish": cfg.publish,
        "router.coord": cfg.coord,
        "control": cfg.control_endpoint,
    }


def check_binds(cfg: Config, endpoints: dict[str, str]) -> None:
    """Fail closed: a bind other hosts can reach needs CURVE, or `security.insecure: true`
    (then a warning, at every start). Raises ConfigError (exit 3) with one line."""
    if cfg.security.curve.authorized_keys_dir:
        return
    open_to_all = exposed(endpoints)
    if not open_to_all:
        return
    first = open_to_all[0]
    if not cfg.security.insecure:
        raise ConfigError(
            f"{first}: {endpoints[first]} is reachable from other hosts without CURVE; set "
            "security.curve (secret_key_file, authorized_keys_dir) or security.insecure: true"
        )
    log.warning("insecure_endpoints", endpoints={label: endpoints[label] for label in open_to_all})
