"""Typed configuration: one YAML file plus an optional overlay, decoded strictly.

A typo is an error naming the file and the key; durations ("50ms", "10s", "7d")
and sizes ("64MiB") are parsed here so nothing downstream handles strings.
"""

from __future__ import annotations

import os
import re
from importlib.metadata import EntryPoint, entry_points
from pathlib import Path
from typing import Annotated, Any, Literal, TypeVar, dataclass_transform

import msgspec
import yaml

from nexus.common import redact
from nexus.common.modules import describe_import_error
from nexus.errors import ConfigError

DEFAULT_CONFIG = "config/default.yaml"
T = TypeVar("T")

# -- units -------------------------------------------------------------------
_DURATION = re.compile(r"\A\s*(\d+(?:\.\d+)?)\s*(ms|s|m|h|d)?\s*\Z")
_DURATION_UNITS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0, None: 1.0}
_SIZE = re.compile(r"\A\s*(\d+(?:\.\d+)?)\s*(B|KB|MB|GB|KiB|MiB|GiB)?\s*\Z")
_SIZE_UNITS = {None: 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "KiB": 2**10, "MiB": 2**20, "GiB": 2**30}


class Duration(float):
    """Seconds; written as a number or as '50ms', '10s', '5m', '1h', '7d'."""


class ByteSize(int):
    """Bytes; written as a number or as '512KiB', '64MiB', '1GB'."""


def parse_duration(value: Any) -> Duration:
    if isinstance(value, bool):
        raise ValueError("expected a duration like '10s'")
    if isinstance(value, (int, float)):
        return Duration(value)
    m = _DURATION.match(str(value))
    if not m:
        raise ValueError(f"{value!r} is not a duration (examples: 50ms, 10s, 5m, 1h, 7d)")
    return Duration(float(m.group(1)) * _DURATION_UNITS[m.group(2)])


def parse_size(value: Any) -> ByteSize:
    if isinstance(value, bool):
        raise ValueError("expected a size like '64MiB'")
    if isinstance(value, int):
        return ByteSize(value)
    m = _SIZE.match(str(value))
    if not m:
        raise ValueError(f"{value!r} is not a size (examples: 4096, 512KiB, 64MiB)")
    return ByteSize(int(float(m.group(1)) * _SIZE_UNITS[m.group(2)]))


def _dec_hook(type_: type, obj: Any) -> Any:
    if type_ is Duration:
        return parse_duration(obj)
    if type_ is ByteSize:
        return parse_size(obj)
    raise NotImplementedError


Positive = Annotated[int, msgspec.Meta(ge=1)]


# dataclass_transform: type checkers see every subclass as frozen too, as msgspec makes it
# (without it mypy reads a subclass as a non-frozen child of a frozen base)
@dataclass_transform(frozen_default=True, field_specifiers=(msgspec.field,))
class Strict(msgspec.Struct, frozen=True, forbid_unknown_fields=True, kw_only=True):
    # a config printed anywhere (a log line, a traceback, a debugger) never shows a
    # secret: fields and dict keys named like one are masked (nexus/common/redact.py)
    def __repr__(self) -> str:
        return redact.struct_repr(self)

    __str__ = __repr__

    def __rich_repr__(self):
        for name in self.__struct_fields__:
            yield name, redact.mask(getattr(self, name), name)


# -- sections ------------------------------------------------------------------
class LogConfig(Strict):
    level: Literal["debug", "info", "warning", "error"] = "info"
    format: Literal["console", "json"] = "console"


class JournalConfig(Strict):
    fsync: Literal["interval", "always", "never"] = "interval"
    fsync_interval_ms: Positive = 50
    segment_bytes: ByteSize = ByteSize(64 * 2**20)
    retain: Duration = Duration(7 * 86400)


class RateLimit(Strict):
    rate: Annotated[float, msgspec.Meta(gt=0)]
    burst: Positive


class RateLimits(Strict):
    default: RateLimit | None = None
    sources: dict[str, RateLimit] = {}


class RouterConfig(Strict):
    ingest: str = "tcp://127.0.0.1:5555"
    confirm: str = "tcp://127.0.0.1:5556"
    publish: str = "ipc://{data_dir}/run/publish"
    coord: str = "ipc://{data_dir}/run/coord"
    max_event_bytes: ByteSize = ByteSize(2**20)
    max_batch: Positive = 5000  # events per producer message
    journal: JournalConfig = JournalConfig()
    rate_limits: RateLimits = RateLimits()
    heartbeat_interval: Duration = Duration(1.0)
    heartbeat_misses: Positive = 3
    fetch_limit: Positive = 10_000  # records per catch-up reply (members ask for up to this)
    fetch_bytes: ByteSize = ByteSize(4 * 2**20)  # event bytes per catch-up reply (always >= 1 event)


class RetryConfig(Strict):
    attempts: Positive = 3
    backoff: list[Duration] = msgspec.field(default_factory=lambda: [Duration(1), Duration(2), Duration(4)])
    max_backoff: Duration = Duration(60)
    jitter: Annotated[float, msgspec.Meta(ge=0, le=1)] = 0.0


class BreakerConfig(Strict):
    failures: Positive = 5  # dependency errors within `window` open it
    window: Duration = Duration(60)
    reset: Duration = Duration(30)  # open this long, then one probe event


class AutoscaleConfig(Strict, kw_only=True):
    """`workers.G.autoscale`: the launcher moves the group's member count within
    [min, max] on its lag (nexus/supervisor/autoscaler.py has the policy)."""

    min: Annotated[int, msgspec.Meta(ge=0, le=256)] = 1
    max: Annotated[int, msgspec.Meta(ge=1, le=256)]
    # events of lag per member the group should stay under (no universal value: required)
    target_lag: Annotated[float, msgspec.Meta(gt=0)]
    # no change within this of the last one; scale-down also needs low lag this long
    cooldown: Duration = Duration(60)


class WorkerGroupConfig(Strict):
    handler: str
    subscribe: list[str] = msgspec.field(default_factory=lambda: ["*"])
    processes: Annotated[int, msgspec.Meta(ge=0, le=256)] = 1
    partitions: Annotated[int, msgspec.Meta(ge=1, le=4096)] = 16
    start: Literal["earliest", "latest"] = "latest"
    retry: RetryConfig = RetryConfig()
    breaker: BreakerConfig = BreakerConfig()
    max_in_flight: Positive = 100_000  # events buffered per member (bench: 60k -> 97k events/s over 10k)
    max_in_flight_bytes: ByteSize = ByteSize(64 * 2**20)  # and their bytes: big events catch up in flat memory
    # async handlers running at once per member (bounded: a black-box slot each, blackbox.MAX_SLOTS)
    concurrency: Annotated[int, msgspec.Meta(ge=1, le=65536)] = 16
    dedup_window: Positive = 100_000  # ids of handled events remembered per member
    options: dict[str, Any] = {}  # handed to the handler as ctx.options
    # A handler call running longer is stuck: an async one is cancelled (a TimeoutError that
    # follows `retry`), a sync one has its member restarted. 5m: well above slow but healthy
    # calls (LLM, uploads, imports), which a timeout would turn into restarts and duplicate
    # work, and still short enough that a stuck partition moves on within minutes.
    handler_timeout: Duration = Duration(300)
    max_crashes: Positive = 3  # member crashes on one event before it is dead-lettered
    max_rss: ByteSize | None = None  # member RSS above this: drain and restart it (recycle)
    max_events: Positive | None = None  # events handled by one member process, then recycle
    autoscale: AutoscaleConfig | None = None  # members follow the lag, within its bounds

    def initial_processes(self) -> int:
        """Members at start: `processes`, clamped into the autoscale bounds if any."""
        if self.autoscale is None:
            return self.processes
        return min(max(self.processes, self.autoscale.min), self.autoscale.max)


class CurveConfig(Strict):
    """CURVE keys (z85 files from `nexus keys generate`); paths are relative to the config
    file. Every key may also come from the environment (see nexus/protocol/curve.py)."""

    secret_key_file: str = ""  # this process's own key pair (NAME.key_secret)
    server_key: str = ""  # a client's: the router's public key (z85 text or its .key file)
    authorized_keys_dir: str = ""  # the router host's: NAME.key + NAME.yaml of each client allowed


class SecurityConfig(Strict):
    curve: CurveConfig = CurveConfig()
    # TCP binds beyond loopback without CURVE: refused unless this is true (warned at every start)
    insecure: bool = False
    # a group whose members may use the ipc sockets (the CLI of other users): the data
    # dir and its run/ folder become searchable (0710) and the sockets 0660 for it;
    # every file stays the owner's alone (nexus/common/private.py)
    ipc_group: str | None = None


class HttpConfig(Strict):
    """The launcher's HTTP port: /metrics, /healthz, /readyz and the dashboard."""

    listen: str = "127.0.0.1:9464"  # host:port; "" turns the port off
    token: str = ""  # bearer token every request must carry; required off loopback


class GatewayTlsConfig(Strict):
    cert: str = ""  # PEM certificate chain (relative to the config file); both or neither
    key: str = ""  # its PEM private key


class GatewayConfig(Strict):
    """The HTTP/WebSocket gateway (nexus/gateway/): producers and consumers that speak
    HTTP. Off unless `listen` is set; a confirmed producer to the router."""

    listen: str = ""  # host:port; "" (default) turns the gateway off
    tls: GatewayTlsConfig = GatewayTlsConfig()
    tokens_file: str = ""  # bearer tokens (`nexus tokens`); "": {data_dir}/gateway-tokens.yaml
    max_body: Annotated[int, msgspec.Meta(ge=1024)] = 1_048_576  # bytes of one request or message
    max_batch: Annotated[int, msgspec.Meta(ge=1)] = 1000  # events in one request

    def tokens_path(self, cfg: Config) -> str:
        return cfg.resolve(self.tokens_file) if self.tokens_file else os.path.join(cfg.data_dir, "gateway-tokens.yaml")


class NatsTlsConfig(Strict):
    """TLS to the NATS servers (paths relative to the config file); all empty: plain,
    unless a server URL says tls://."""

    ca: str = ""  # CA bundle that signed the servers' certificates
    cert: str = ""  # client certificate (mutual TLS); both or neither
    key: str = ""


class NatsConfig(Strict):
    """`engine: nats`: the pipeline runs on a NATS JetStream cluster (nexus/jetstream/).
    Every name on the cluster derives from `stream`, so two pipelines share a cluster
    by choosing two streams."""

    servers: list[str] = msgspec.field(default_factory=lambda: ["nats://127.0.0.1:4222"])
    stream: str = "NEXUS"  # the events stream; NEXUS_DLQ, NEXUS_REJECTED, KV NEXUS_groups
    replicas: Annotated[int, msgspec.Meta(ge=1, le=5)] = 1  # copies of every stream and bucket
    # subjects the events are spread over by key hash; a group's partition p reads the
    # shards s with s % partitions == p, so every group's partitions must divide this
    shards: Annotated[int, msgspec.Meta(ge=1, le=4096)] = 64
    credentials: str = ""  # a NATS .creds file (user JWT + nkey seed)
    token: str = ""  # or a server token
    user: str = ""  # or a user and password
    password: str = ""
    tls: NatsTlsConfig = NatsTlsConfig()
    # the launcher starts (and stops) a single-node nats-server for the first URL in
    # `servers`, its store under {data_dir}/nats: development without a cluster
    embedded_server: bool = False
    max_age: Duration = Duration(7 * 86400)  # events kept this long (journal.retain's twin)
    max_bytes: ByteSize | None = None  # and at most this much (oldest dropped first)
    dedup_window: Duration = Duration(120)  # a resend with the same event id within it is dropped
    rejected_max: Positive = 100_000  # rejected events kept with their reason


class SourceConfig(Strict, kw_only=True):
    """The options of one `producers:` entry: the keys every kind has (`kind`), which each
    source kind's `Config` subclasses with its own. Strict like every section: a typo in a
    plugin's option is an `unknown key` error too. Decoded through the source registry below.
    (kw_only: a subclass may declare required keys after this default.)"""

    kind: str = ""


class Config(Strict):
    data_dir: str = "./var"
    # embedded: the router and its journal on this machine (default); nats: a NATS
    # JetStream cluster stores, replicates and hands out the events (see `nats`)
    engine: Literal["embedded", "nats"] = "embedded"
    nats: NatsConfig = NatsConfig()
    log: LogConfig = LogConfig()
    router: RouterConfig = RouterConfig()
    contracts: list[str] = msgspec.field(default_factory=lambda: ["nexus.contracts"])
    contracts_untyped: list[str] = []  # glob patterns of types allowed without a contract
    control: str = "ipc://{data_dir}/run/control"
    security: SecurityConfig = SecurityConfig()
    http: HttpConfig = HttpConfig()
    gateway: GatewayConfig = GatewayConfig()
    shutdown_timeout: Duration = Duration(30)
    restart_backoff: list[Duration] = msgspec.field(
        default_factory=lambda: [Duration(0.5), Duration(1), Duration(2), Duration(5)]
    )
    crash_loop: Annotated[int, msgspec.Meta(ge=1)] = 5  # restarts within crash_window -> give up
    crash_window: Duration = Duration(60)
    hang_timeout: Duration = Duration(30)  # a router or member silent this long is restarted
    # name -> the kind's SourceConfig subclass; Any to msgspec, which cannot know the kinds
    # installed: load() and from_bytes() decode each entry through the registry below
    producers: dict[str, Any] = {}
    workers: dict[str, WorkerGroupConfig] = {}
    # set by load(): where the config came from, for messages and relative paths
    source: str = ""

    def endpoint(self, template: str) -> str:
        return template.replace("{data_dir}", self.data_dir)

    @property
    def ingest(self) -> str:
        return self.endpoint(self.router.ingest)

    @property
    def confirm(self) -> str:
        return self.endpoint(self.router.confirm)

    @property
    def publish(self) -> str:
        return self.endpoint(self.router.publish)

    @property
    def coord(self) -> str:
        return self.endpoint(self.router.coord)

    @property
    def control_endpoint(self) -> str:
        return self.endpoint(self.control)

    def resolve(self, path: str) -> str:
        """A path from the config, relative to the config file's folder."""
        base = Path(self.source).parent if self.source else Path.cwd()
        return str((base / os.path.expanduser(path)).resolve())


# -- where handler and contract modules are found ------------------------------------
def module_paths(cfg: Config) -> list[str]:
    """Folders searched for `handler:` and `contracts:` modules after the installed
    packages: the current directory (as `python -m` does; the `nexus` script alone would
    not) and the config file's folder (so a config and its handlers work from any cwd)."""
    paths = [os.getcwd()]
    if cfg.source:
        paths.append(str(Path(cfg.source).parent))
    return paths


def add_module_paths(cfg: Config) -> None:
    """Appended, never prepended: a file next to the config cannot shadow the standard
    library, an installed package or nexus itself. Spawned children inherit sys.path."""
    import sys

    for path in module_paths(cfg):
        if path not in sys.path and not (path == os.getcwd() and "" in sys.path):
            sys.path.append(path)


# -- producers: source kinds are plugins --------------------------------------------
# A kind is a class registered under this entry-point group (see nexus/sources/base.py);
# the built-ins register the same way in pyproject.toml.
SOURCES_GROUP = "nexus.sources"
# The built-ins' entries as pyproject.toml declares them, for a checkout run without
# `pip install` (or with metadata installed before a kind was added): an installed entry
# point of the same name wins. tests/unit/test_source_registry.py keeps the two equal.
BUILTIN_SOURCES = {
    "file": "nexus.sources.file:FileSource",
    "imap": "nexus.sources.imap:ImapSource",
    "schedule": "nexus.sources.schedule:ScheduleSource",
}


def source_kinds() -> dict[str, EntryPoint]:
    """The installed kinds, read from the package metadata now (not cached: a config
    loaded after a `pip install` sees the new kind)."""
    kinds = {name: EntryPoint(name, value, SOURCES_GROUP) for name, value in BUILTIN_SOURCES.items()}
    kinds.update((ep.name, ep) for ep in entry_points(group=SOURCES_GROUP))
    return kinds


def source_class(kind: str, kinds: dict[str, EntryPoint] | None = None) -> Any:
    """The class of a source kind, imported. ConfigError without the file and key (the
    caller knows them): an unknown kind names the installed ones."""
    kinds = source_kinds() if kinds is None else kinds
    ep = kinds.get(kind)
    if ep is None:
        raise ConfigError(f"unknown kind {kind!r} (installed: {', '.join(sorted(kinds))})")
    try:
        cls = ep.load()
    except Exception as exc:  # noqa: BLE001 - a plugin can raise anything at import
        raise ConfigError(f"cannot load kind {kind!r} ({ep.value}): {describe_import_error(exc)}") from None
    config_type = getattr(cls, "Config", None)
    if not (isinstance(cls, type) and isinstance(config_type, type) and issubclass(config_type, SourceConfig)):
        raise ConfigError(f"kind {kind!r} ({ep.value}) is not a source: it needs a Config subclassing SourceConfig")
    return cls


class _Kind(msgspec.Struct):
    """An entry's `kind` alone (other keys ignored): read first, to pick the struct."""

    kind: str


def _decode_producers(entries: dict, files: str, kinds: dict[str, EntryPoint]) -> dict[str, SourceConfig]:
    """Each `producers:` entry into its kind's Config; errors name the entry's key."""
    decoded = {}
    for name, value in entries.items():
        kind = _convert_entry("producers", name, value, _Kind, files).kind
        try:
            cls = source_class(kind, kinds)
        except ConfigError as exc:
            raise ConfigError(f"{files}: producers.{name}.kind: {exc}") from None
        decoded[name] = _convert_entry("producers", name, value, cls.Config, files)
    return decoded


# -- handing a validated config to a child ------------------------------------------
def to_bytes(cfg: Config) -> bytes:
    """The decoded config as msgpack (the launcher hands it over instead of the file)."""
    return msgspec.msgpack.encode(cfg, enc_hook=lambda o: int(o) if isinstance(o, int) else float(o))


def from_bytes(raw: bytes) -> Config:
    cfg = msgspec.msgpack.decode(raw, type=Config, dec_hook=_dec_hook)
    producers = _decode_producers(cfg.producers, cfg.source or "config", source_kinds())
    redact.register_from(cfg)  # this process holds the config's secrets: never show them
    return msgspec.structs.replace(cfg, producers=producers)


# What a reload applies to a running pipeline (see docs/operations.md, "Reload"): the
# worker groups, producers and the HTTP port (the launcher starts, stops and restarts
# their processes), rate limits and the log level (every process), and the launcher's own
# supervision settings, which it reads at each use. Everything else (endpoints, data_dir,
# journal, security, contracts, ...) is bound into running processes: a restart applies it.
LIVE_KEYS = (
    "workers",
    "producers",
    "http",
    "gateway",
    "restart_backoff",
    "crash_loop",
    "crash_window",
    "hang_timeout",
)


def adopt_live(old: Config, new: Config) -> Config:
    """`old` with what a reload applies live taken from `new`: the config a running
    pipeline adopts (children started later get it; the rest waits for a restart)."""
    live = {key: getattr(new, key) for key in LIVE_KEYS}
    return msgspec.structs.replace(
        old,
        log=msgspec.structs.replace(old.log, level=new.log.level),
        router=msgspec.structs.replace(old.router, rate_limits=new.router.rate_limits),
        **live,
    )


def needs_restart(old: Config, new: Config) -> list[str]:
    """The keys changed between two configs that only a restart applies, dotted
    (`router.ingest`, `security.curve.secret_key_file`)."""
    return _differences(adopt_live(old, new), new, "")


def _differences(a: Any, b: Any, prefix: str) -> list[str]:
    if isinstance(a, Strict) and type(a) is type(b):
        out: list[str] = []
        for name in a.__struct_fields__:
            out += _differences(getattr(a, name), getattr(b, name), f"{prefix}{name}.")
        return out
    return [prefix.rstrip(".")] if a != b else []


# -- loading -------------------------------------------------------------------
def _merge(base: dict, overlay: dict) -> dict:
    out = dict(base)
    for key, value in overlay.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = _merge(out[key], value)
        else:
            out[key] = value
    return out


def _read_yaml(path: Path) -> dict:
    try:
        text = path.read_text()
    except FileNotFoundError:
        raise ConfigError(f"{path}: config file not found") from None
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read config: {exc.strerror}") from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" line {mark.line + 1}" if mark else ""
        problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
        raise ConfigError(f"{path}:{where}: invalid YAML: {problem}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: the top level must be a mapping of keys")
    return data


_AT = re.compile(r"^(.*?)(?: - at `\$(.*)`)?$", re.S)


def _describe(exc: msgspec.ValidationError, files: str) -> str:
    m = _AT.match(str(exc))
    message, where = (m.group(1), m.group(2)) if m else (str(exc), None)
    path = ""
    if where:
        path = re.sub(r"\[(\d+)\]", r".\1", where).lstrip(".")
        path = re.sub(r"\['([^']*)'\]", r".\1", path).lstrip(".")
    unknown = re.match(r"Object contains unknown field `(.*)`", message)
    if unknown:
        key = f"{path}.{unknown.group(1)}" if path else unknown.group(1)
        return f"{files}: {key}: unknown key"
    missing = re.match(r"Object missing required field `(.*)`", message)
    if missing:
        key = f"{path}.{missing.group(1)}" if path else missing.group(1)
        return f"{files}: {key}: required key is missing"
    return f"{files}: {path or '(top level)'}: {message}"


def find_config(path: str | None) -> Path:
    chosen = path or os.environ.get("NEXUS_CONFIG")
    if chosen:
        return Path(chosen)
    if Path(DEFAULT_CONFIG).exists():
        return Path(DEFAULT_CONFIG)
    raise ConfigError(f"no config file: pass -c FILE or set NEXUS_CONFIG (looked for {DEFAULT_CONFIG})")


def load(path: str | os.PathLike | None = None, env: str | None = None) -> Config:
    """Load a config file and its environment overlay (`--env`/NEXUS_ENV)."""
    main = find_config(str(path) if path else None).resolve()
    data = _read_yaml(main)
    files = str(main)
    env = env or os.environ.get("NEXUS_ENV") or None
    if env:
        if not re.fullmatch(r"[A-Za-z0-9_-]+", env):
            raise ConfigError(f"--env {env!r}: only letters, digits, '-' and '_' are allowed")
        overlay_path = main.parent / f"{env}.yaml"
        if not overlay_path.exists():
            raise ConfigError(f"{overlay_path}: overlay for --env {env} not found")
        data = _merge(data, _read_yaml(overlay_path))
        files = f"{main} + {overlay_path.name}"
    data.pop("source", None)
    redact.register_from(data)  # before anything can fail: no error line shows a secret in the file
    # dict-valued sections entry by entry first, so an error names the entry
    kinds = source_kinds()
    producers = data.get("producers")
    decoded = _decode_producers(producers, files, kinds) if isinstance(producers, dict) else {}
    workers = data.get("workers")
    for name, value in workers.items() if isinstance(workers, dict) else ():
        _convert_entry("workers", name, value, WorkerGroupConfig, files)
    try:
        cfg = msgspec.convert(data, Config, dec_hook=_dec_hook)
    except msgspec.ValidationError as exc:
        raise ConfigError(_describe(exc, files)) from None
    data_dir = str((main.parent / os.path.expanduser(cfg.data_dir)).resolve())
    cfg = msgspec.structs.replace(cfg, data_dir=data_dir, source=str(main), producers=decoded)
    _check(cfg, files, kinds)
    return cfg


def _convert_entry(section: str, name: str, value: Any, typ: type[T], files: str) -> T:
    """One entry of a dict-valued section; an error names `section.name.key`."""
    try:
        return msgspec.convert(value, typ, dec_hook=_dec_hook)
    except msgspec.ValidationError as exc:
        message = _describe(exc, files)
        prefix = f"{files}: "
        rest = message[len(prefix) :] if message.startswith(prefix) else message
        rest = rest.replace("(top level)", "", 1).lstrip(".")
        raise ConfigError(f"{files}: {section}.{name}{'.' if not rest.startswith(':') else ''}{rest}") from None


# the launcher's processes that are not configured by name (nexus/supervisor/launcher.py
# `_add`; "launcher" is its own name in logs and status): the launcher keys its children
# by name, so a producer called "gateway" would replace the gateway's process
FIXED_PROCESSES = ("router", "http", "gateway", "launcher")


def _check_process_names(cfg: Config, files: str) -> None:
    """Producers are processes named as configured, worker groups' members `{group}-{i}`."""
    for kind, names in (("producers", cfg.producers), ("workers", cfg.workers)):
        for name in names:
            if name in FIXED_PROCESSES:
                raise ConfigError(
                    f"{files}: {kind}.{name}: the name is reserved for the pipeline's own process "
                    f"({', '.join(FIXED_PROCESSES)}); choose another"
                )
    for name in cfg.producers:
        group, _, index = name.rpartition("-")
        if index.isdigit() and group in cfg.workers:
            raise ConfigError(
                f"{files}: producers.{name}: a member of workers.{group} has that process name; choose another"
            )


def _check_nats(cfg: Config, files: str) -> None:
    nats = cfg.nats
    if not re.fullmatch(r"[A-Za-z0-9_-]{1,32}", nats.stream):
        raise ConfigError(f"{files}: nats.stream: use 1-32 letters, digits, '-' or '_' (got {nats.stream!r})")
    if not nats.servers:
        raise ConfigError(f"{files}: nats.servers: name at least one server URL (nats://host:4222)")
    for url in nats.servers:
        if not re.fullmatch(r"(nats|tls)://[^\s/]+(:\d+)?", url):
            raise ConfigError(f"{files}: nats.servers: {url!r} is not a nats://host:port or tls://host:port URL")
    if bool(nats.tls.cert) != bool(nats.tls.key):
        raise ConfigError(f"{files}: nats.tls: cert and key go together (mutual TLS) or not at all")
    if nats.embedded_server and nats.replicas > 1:
        raise ConfigError(
            f"{files}: nats.replicas: {nats.replicas} copies need a cluster; embedded_server starts one node (use 1)"
        )
    for name, group in cfg.workers.items():
        if nats.shards % group.partitions:
            raise ConfigError(
                f"{files}: workers.{name}.partitions ({group.partitions}) must divide nats.shards ({nats.shards})"
            )


def _check(cfg: Config, files: str, kinds: dict[str, EntryPoint]) -> None:
    if cfg.security.ipc_group is not None:
        import grp

        try:
            grp.getgrnam(cfg.security.ipc_group)
        except KeyError:
            raise ConfigError(f"{files}: security.ipc_group: no group named {cfg.security.ipc_group!r}") from None
    for name, group in cfg.workers.items():
        if not re.fullmatch(r"[A-Za-z0-9_-]{1,64}", name):
            raise ConfigError(f"{files}: workers.{name}: group names use letters, digits, '-', '_'")
        if group.handler_timeout <= 0:
            raise ConfigError(f"{files}: workers.{name}.handler_timeout: must be positive")
        if ":" not in group.handler:
            raise ConfigError(f"{files}: workers.{name}.handler: expected 'module:function', got {group.handler!r}")
        auto = group.autoscale
        if auto is not None:
            if auto.min > auto.max:
                raise ConfigError(f"{files}: workers.{name}.autoscale: min {auto.min} is above max {auto.max}")
            if auto.cooldown <= 0:
                raise ConfigError(f"{files}: workers.{name}.autoscale.cooldown: must be positive")
            if auto.max > group.partitions:
                # a member beyond the partition count owns none: it idles, yet would count
                # in the lag per member the autoscaler divides by
                raise ConfigError(
                    f"{files}: workers.{name}.autoscale.max ({auto.max}) exceeds workers.{name}.partitions "
                    f"({group.partitions}): members beyond {group.partitions} would own no partition"
                )
    for name in cfg.producers:
        if not re.fullmatch(r"[A-Za-z0-9_.-]{1,64}", name):
            raise ConfigError(f"{files}: producers.{name}: names use letters, digits, '-', '_', '.'")
    _check_process_names(cfg, files)
    if cfg.engine == "nats":
        _check_nats(cfg, files)
    for name, spec in cfg.producers.items():
        try:  # the kind's own checks (a cron expression, a timezone): fail at load, not later
            source_class(spec.kind, kinds).check(name, spec, cfg)
        except ConfigError as exc:
            raise ConfigError(f"{files}: {exc}") from None
    for label, endpoint in (
        ("router.ingest", cfg.ingest),
        ("router.confirm", cfg.confirm),
        ("router.publish", cfg.publish),
        ("router.coord", cfg.coord),
        ("control", cfg.control_endpoint),
    ):
        if not re.fullmatch(r"(tcp|ipc|inproc)://[^\x00-\x1f\x7f]+", endpoint):  # whole string
            raise ConfigError(f"{files}: {label}: {endpoint!r} is not a tcp://, ipc:// or inproc:// endpoint")
        if endpoint.startswith("ipc://") and len(endpoint) - 6 > 100:
            raise ConfigError(f"{files}: {label}: ipc path is longer than 100 characters; use a shorter data_dir")
    curve = cfg.security.curve
    if curve.authorized_keys_dir and not curve.secret_key_file:
        raise ConfigError(
            f"{files}: security.curve.secret_key_file: required with authorized_keys_dir (the router's own key pair)"
        )
