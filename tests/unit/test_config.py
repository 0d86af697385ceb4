"""Unit tests for nexus/config.py: loading, units, overlays and error messages."""

from __future__ import annotations

from pathlib import Path

import pytest

from nexus import config
from nexus.config import ByteSize, Duration, parse_duration, parse_size
from nexus.errors import ConfigError

REPO = Path(__file__).parents[2]


@pytest.fixture(autouse=True)
def _clean_env(monkeypatch):
    monkeypatch.delenv("NEXUS_ENV", raising=False)
    monkeypatch.delenv("NEXUS_CONFIG", raising=False)


def write(tmp_path: Path, text: str, name: str = "nexus.yaml") -> Path:
    p = tmp_path / name
    p.write_text(text)
    return p


def load_error(path: Path, env: str | None = None) -> str:
    with pytest.raises(ConfigError) as info:
        config.load(path, env=env)
    return str(info.value)


# -- defaults ------------------------------------------------------------------------
def test_empty_file_gives_defaults(tmp_path):
    cfg = config.load(write(tmp_path, ""))
    assert cfg.data_dir == str((tmp_path / "var").resolve())
    assert cfg.source == str((tmp_path / "nexus.yaml").resolve())
    assert cfg.log.level == "info" and cfg.log.format == "console"
    j = cfg.router.journal
    assert (j.fsync, j.fsync_interval_ms, j.segment_bytes, j.retain) == ("interval", 50, 64 * 2**20, 7 * 86400)
    assert cfg.router.max_event_bytes == 2**20
    assert cfg.router.max_batch == 5000
    assert cfg.router.heartbeat_interval == 1.0 and cfg.router.heartbeat_misses == 3
    assert cfg.router.rate_limits.default is None and cfg.router.rate_limits.sources == {}
    assert cfg.contracts == ["nexus.contracts"]
    assert cfg.contracts_untyped == []
    assert cfg.shutdown_timeout == 30
    assert cfg.restart_backoff == [0.5, 1, 2, 5]
    assert cfg.producers == {} and cfg.workers == {}
    assert cfg.ingest == "tcp://127.0.0.1:5555"
    assert cfg.confirm == "tcp://127.0.0.1:5556"


def test_empty_mapping_gives_defaults(tmp_path):
    assert config.load(write(tmp_path, "{}\n")).router.max_batch == 5000


def test_worker_group_defaults(tmp_path):
    cfg = config.load(write(tmp_path, "workers: {w: {handler: 'pkg.mod:fn'}}\n"))
    g = cfg.workers["w"]
    assert g.handler == "pkg.mod:fn"
    assert g.subscribe == ["*"] and g.processes == 1 and g.partitions == 16 and g.start == "latest"
    assert g.retry.attempts == 3 and g.retry.backoff == [1, 2, 4]
    assert g.options == {}


# -- units ---------------------------------------------------------------------------
@pytest.mark.parametrize(
    "text,seconds",
    [
        ("50ms", 0.05),
        ("10s", 10.0),
        ("5m", 300.0),
        ("1h", 3600.0),
        ("7d", 7 * 86400.0),
        ("1.5s", 1.5),
        (" 2 s ", 2.0),
        ("3", 3.0),
        (3, 3.0),
        (0.25, 0.25),
        (0, 0.0),
    ],
)
def test_parse_duration(text, seconds):
    value = parse_duration(text)
    assert isinstance(value, Duration)
    assert value == pytest.approx(seconds)


@pytest.mark.parametrize("text", ["10q", "s", "-1s", "1 0s", "ten seconds", True, ""])
def test_parse_duration_rejects(text):
    with pytest.raises(ValueError):
        parse_duration(text)


@pytest.mark.parametrize(
    "text,size",
    [
        ("64MiB", 64 * 2**20),
        ("1GB", 10**9),
        ("512KiB", 512 * 1024),
        ("1KB", 1000),
        ("2MB", 2 * 10**6),
        ("1GiB", 2**30),
        ("10B", 10),
        (4096, 4096),
        ("4096", 4096),
        ("1.5KiB", 1536),
    ],
)
def test_parse_size(text, size):
    value = parse_size(text)
    assert isinstance(value, ByteSize)
    assert value == size


@pytest.mark.parametrize("text", ["64 mebibytes", "1TB", "-5", "MiB", False])
def test_parse_size_rejects(text):
    with pytest.raises(ValueError):
        parse_size(text)


def test_units_in_a_file(tmp_path):
    cfg = config.load(
        write(
            tmp_path,
            """
router:
  max_event_bytes: 64MiB
  heartbeat_interval: 250ms
  journal: {segment_bytes: 1GB, retain: 7d, fsync_interval_ms: 10}
shutdown_timeout: 10s
restart_backoff: [50ms, 1, 2.5, 1m]
workers:
  w: {handler: 'a:b', retry: {backoff: [100ms, 2s], max_backoff: 1h}}
producers:
  tick: {kind: schedule, every: 10s}
  inbox: {kind: file, paths: [./in], debounce: 200ms}
""",
        )
    )
    assert cfg.router.max_event_bytes == 64 * 2**20
    assert cfg.router.heartbeat_interval == pytest.approx(0.25)
    assert cfg.router.journal.segment_bytes == 10**9
    assert cfg.router.journal.retain == 7 * 86400
    assert cfg.router.journal.fsync_interval_ms == 10
    assert cfg.shutdown_timeout == 10
    assert cfg.restart_backoff == pytest.approx([0.05, 1, 2.5, 60])
    assert cfg.workers["w"].retry.backoff == pytest.approx([0.1, 2])
    assert cfg.workers["w"].retry.max_backoff == 3600
    assert cfg.producers["tick"].every == 10
    assert cfg.producers["inbox"].debounce == pytest.approx(0.2)
    assert cfg.producers["inbox"].paths == ["./in"]
    assert isinstance(cfg.router.max_event_bytes, int)
    assert isinstance(cfg.shutdown_timeout, float)


def test_sizes_as_plain_ints(tmp_path):
    cfg = config.load(write(tmp_path, "router: {max_event_bytes: 4096, journal: {segment_bytes: 1000}}\n"))
    assert cfg.router.max_event_bytes == 4096
    assert cfg.router.journal.segment_bytes == 1000


# -- overlays ------------------------------------------------------------------------
BASE = """
log: {level: info, format: console}
router:
  journal: {fsync: interval, retain: 7d}
  max_batch: 100
"""


def test_overlay_by_argument(tmp_path):
    main = write(tmp_path, BASE)
    write(tmp_path, "log: {level: debug}\nrouter: {journal: {fsync: always}}\n", "dev.yaml")
    cfg = config.load(main, env="dev")
    assert cfg.log.level == "debug"
    assert cfg.log.format == "console"  # deep merge keeps siblings
    assert cfg.router.journal.fsync == "always"
    assert cfg.router.journal.retain == 7 * 86400
    assert cfg.router.max_batch == 100
    # without env, the base only
    assert config.load(main).log.level == "info"


def test_overlay_by_nexus_env(tmp_path, monkeypatch):
    main = write(tmp_path, BASE)
    write(tmp_path, "router: {max_batch: 7}\n", "staging.yaml")
    monkeypatch.setenv("NEXUS_ENV", "staging")
    assert config.load(main).router.max_batch == 7


def test_overlay_argument_wins_over_nexus_env(tmp_path, monkeypatch):
    main = write(tmp_path, BASE)
    write(tmp_path, "router: {max_batch: 7}\n", "staging.yaml")
    write(tmp_path, "router: {max_batch: 9}\n", "prod.yaml")
    monkeypatch.setenv("NEXUS_ENV", "staging")
    assert config.load(main, env="prod").router.max_batch == 9


def test_missing_overlay_is_an_error(tmp_path, monkeypatch):
    main = write(tmp_path, BASE)
    msg = load_error(main, env="nosuch")
    assert str(tmp_path / "nosuch.yaml") in msg and "not found" in msg
    monkeypatch.setenv("NEXUS_ENV", "ghost")
    msg = load_error(main)
    assert "ghost.yaml" in msg and "not found" in msg


def test_overlay_name_is_checked(tmp_path):
    main = write(tmp_path, BASE)
    msg = load_error(main, env="../etc/passwd")
    assert "only letters" in msg


def test_error_in_overlay_names_both_files(tmp_path):
    main = write(tmp_path, BASE)
    write(tmp_path, "router: {journal: {fsynk: always}}\n", "dev.yaml")
    msg = load_error(main, env="dev")
    assert str(main.resolve()) in msg and "dev.yaml" in msg
    assert "router.journal.fsynk: unknown key" in msg


def test_bad_yaml_in_overlay_names_the_overlay(tmp_path):
    main = write(tmp_path, BASE)
    write(tmp_path, "log: {level: debug\n", "dev.yaml")
    msg = load_error(main, env="dev")
    assert "dev.yaml" in msg and "invalid YAML" in msg


def test_missing_main_file(tmp_path):
    msg = load_error(tmp_path / "absent.yaml")
    assert str(tmp_path / "absent.yaml") in msg and "not found" in msg


# -- error messages ---------------------------------------------------------------------
@pytest.mark.parametrize(
    "text,key",
    [
        ("bogus: 1\n", "bogus"),
        ("router: {bogus: 1}\n", "router.bogus"),
        ("router: {journal: {fsynk: always}}\n", "router.journal.fsynk"),
        ("router: {rate_limits: {default: {rate: 1, burst: 1, bursty: 2}}}\n", "router.rate_limits.default.bursty"),
        ("log: {colour: true}\n", "log.colour"),
        ("workers: {w: {handler: 'a:b', procs: 2}}\n", "workers.w.procs"),
        ("workers: {w: {handler: 'a:b', retry: {tries: 2}}}\n", "workers.w.retry.tries"),
        ("producers: {tick: {kind: schedule, every: 1s, evry: 2s}}\n", "producers.tick.evry"),
        ("producers: {inbox: {kind: file, paths: [x], pattern: ['*']}}\n", "producers.inbox.pattern"),
    ],
)
def test_unknown_key_is_named(tmp_path, text, key):
    path = write(tmp_path, text)
    msg = load_error(path)
    assert msg == f"{path.resolve()}: {key}: unknown key"


@pytest.mark.parametrize(
    "text,key",
    [
        ("workers: {w: {subscribe: ['*']}}\n", "workers.w.handler"),
        ("producers: {inbox: {kind: file}}\n", "producers.inbox.paths"),
        ("producers: {mail: {kind: imap, host: h}}\n", "producers.mail.username"),
        ("router: {rate_limits: {default: {burst: 1}}}\n", "router.rate_limits.default.rate"),
    ],
)
def test_missing_required_key_is_named(tmp_path, text, key):
    path = write(tmp_path, text)
    assert load_error(path) == f"{path.resolve()}: {key}: required key is missing"


@pytest.mark.parametrize(
    "text,key,needle",
    [
        ("router: {max_batch: abc}\n", "router.max_batch", "Expected `int`, got `str`"),
        ("router: {max_batch: 0}\n", "router.max_batch", ">= 1"),
        ("router: []\n", "router", "Expected `object`, got `array`"),
        ("log: {level: loud}\n", "log.level", "loud"),
        ("contracts: nexus.contracts\n", "contracts", "Expected `array`, got `str`"),
        ("workers: {w: {handler: 'a:b', processes: many}}\n", "workers.w.processes", "Expected `int`"),
        ("workers: {w: {handler: 'a:b', partitions: 0}}\n", "workers.w.partitions", ">= 1"),
        ("workers: {w: {handler: 'a:b', start: middle}}\n", "workers.w.start", "middle"),
        ("producers: {tick: {kind: schedule, every: 1s, priority: 11}}\n", "producers.tick.priority", "<= 10"),
        ("producers: {tick: {kind: teleport}}\n", "producers.tick.kind", "teleport"),
    ],
)
def test_wrong_type_is_named(tmp_path, text, key, needle):
    path = write(tmp_path, text)
    msg = load_error(path)
    assert msg.startswith(f"{path.resolve()}: {key}: ")
    assert needle in msg


@pytest.mark.parametrize(
    "text,key",
    [
        ("shutdown_timeout: 10q\n", "shutdown_timeout"),
        ("router: {journal: {retain: forever}}\n", "router.journal.retain"),
        ("router: {heartbeat_interval: 1x}\n", "router.heartbeat_interval"),
        ("restart_backoff: [1s, 2q]\n", "restart_backoff.1"),
        ("workers: {w: {handler: 'a:b', retry: {backoff: [1s, 10q]}}}\n", "workers.w.retry.backoff.1"),
        ("producers: {tick: {kind: schedule, every: soon}}\n", "producers.tick.every"),
    ],
)
def test_invalid_duration_is_named(tmp_path, text, key):
    path = write(tmp_path, text)
    msg = load_error(path)
    assert msg.startswith(f"{path.resolve()}: {key}: ")
    assert "is not a duration" in msg


def test_invalid_size_is_named(tmp_path):
    path = write(tmp_path, "router: {max_event_bytes: lots}\n")
    msg = load_error(path)
    assert msg.startswith(f"{path.resolve()}: router.max_event_bytes: ")
    assert "is not a size" in msg


def test_bad_yaml_reports_line(tmp_path):
    path = write(tmp_path, "log: {level: info}\nrouter:\n  max_batch: [1, 2\n  ingest: x\n")
    msg = load_error(path)
    assert msg.startswith(f"{path.resolve()}: line 4: invalid YAML")


def test_bad_yaml_tab_indent_reports_line(tmp_path):
    path = write(tmp_path, "log:\n  level: info\n\tformat: json\n")
    msg = load_error(path)
    assert str(path.resolve()) in msg and "line 3" in msg and "invalid YAML" in msg


@pytest.mark.parametrize("text", ["- a\n- b\n", "just a string\n", "42\n"])
def test_top_level_must_be_mapping(tmp_path, text):
    path = write(tmp_path, text)
    assert load_error(path) == f"{path.resolve()}: the top level must be a mapping of keys"


# -- schedules --------------------------------------------------------------------------
def test_schedule_every_or_cron(tmp_path):
    cfg = config.load(
        write(tmp_path, "producers: {a: {kind: schedule, every: 5m}, b: {kind: schedule, cron: '*/5 * * * *'}}\n")
    )
    assert cfg.producers["a"].every == 300 and cfg.producers["a"].cron is None
    assert cfg.producers["b"].cron == "*/5 * * * *" and cfg.producers["b"].every is None


@pytest.mark.parametrize("body", ["{kind: schedule}", "{kind: schedule, every: 1s, cron: '* * * * *'}"])
def test_schedule_needs_exactly_one(tmp_path, body):
    path = write(tmp_path, f"producers: {{tick: {body}}}\n")
    msg = load_error(path)
    assert msg == f"{path.resolve()}: producers.tick: a schedule needs exactly one of `every` or `cron`"


def test_schedule_every_must_be_positive(tmp_path):
    path = write(tmp_path, "producers: {tick: {kind: schedule, every: 0s}}\n")
    assert "producers.tick" in load_error(path) and "positive" in load_error(path)


# -- names and endpoints --------------------------------------------------------------------
def test_handler_needs_module_and_function(tmp_path):
    path = write(tmp_path, "workers: {w: {handler: justamodule}}\n")
    msg = load_error(path)
    assert "workers.w.handler" in msg and "module:function" in msg


def test_bad_group_name(tmp_path):
    path = write(tmp_path, "workers: {'bad name': {handler: 'a:b'}}\n")
    assert "workers.bad name" in load_error(path)


@pytest.mark.parametrize("name", ["gateway", "http", "router", "launcher"])
@pytest.mark.parametrize(
    "text",
    [
        "producers: {{{name}: {{kind: schedule, every: 1s}}}}\n",
        "workers: {{{name}: {{handler: 'a:b'}}}}\n",
    ],
)
def test_a_fixed_process_name_is_refused(tmp_path, name, text):
    # the launcher keys its children by name: a producer named "gateway" would replace the
    # gateway's process; a group named "router" makes `nexus status` and the logs ambiguous
    msg = load_error(write(tmp_path, text.format(name=name)))
    kind = "producers" if text.startswith("producers") else "workers"
    assert f"{kind}.{name}" in msg and "reserved" in msg and "\n" not in msg


def test_a_producer_named_like_a_worker_process_is_refused(tmp_path):
    text = "workers: {rec: {handler: 'a:b'}}\nproducers: {rec-0: {kind: schedule, every: 1s}}\n"
    msg = load_error(write(tmp_path, text))
    assert "producers.rec-0" in msg and "workers.rec" in msg and "\n" not in msg


def test_endpoint_data_dir_substitution(tmp_path):
    path = write(
        tmp_path,
        """
data_dir: ./state
router:
  ingest: ipc://{data_dir}/run/in
  publish: ipc://{data_dir}/run/pub
control: ipc://{data_dir}/run/ctl
""",
    )
    cfg = config.load(path)
    dd = str((tmp_path / "state").resolve())
    assert cfg.data_dir == dd
    assert cfg.ingest == f"ipc://{dd}/run/in"
    assert cfg.publish == f"ipc://{dd}/run/pub"
    assert cfg.coord == f"ipc://{dd}/run/coord"
    assert cfg.control_endpoint == f"ipc://{dd}/run/ctl"
    # the raw templates keep the placeholder
    assert cfg.router.publish == "ipc://{data_dir}/run/pub"
    assert cfg.endpoint("x{data_dir}y") == f"x{dd}y"


def test_data_dir_relative_to_config_file_not_cwd(tmp_path, monkeypatch):
    sub = tmp_path / "conf"
    sub.mkdir()
    path = write(sub, "data_dir: ../data\n")
    other = tmp_path / "elsewhere"
    other.mkdir()
    monkeypatch.chdir(other)
    cfg = config.load(path)
    assert cfg.data_dir == str((tmp_path / "data").resolve())
    assert cfg.resolve("inbox") == str((sub / "inbox").resolve())
    assert cfg.resolve("/abs/x") == "/abs/x"


def test_absolute_data_dir_is_kept(tmp_path):
    target = tmp_path / "abs"
    cfg = config.load(write(tmp_path, f"data_dir: {target}\n"))
    assert cfg.data_dir == str(target.resolve())


def test_bad_endpoint_scheme(tmp_path):
    path = write(tmp_path, "router: {ingest: 'http://x'}\n")
    msg = load_error(path)
    assert "router.ingest" in msg and "tcp://" in msg


def test_source_key_in_file_is_ignored(tmp_path):
    path = write(tmp_path, "source: /somewhere/else.yaml\n")
    assert config.load(path).source == str(path.resolve())


# -- the repo's own config -----------------------------------------------------------------
DEFAULT = REPO / "config/default.yaml"


def test_repo_default_config_loads():
    cfg = config.load(DEFAULT)
    assert cfg.source == str(DEFAULT.resolve())
    assert cfg.data_dir == str((REPO / "var").resolve())
    assert cfg.router.journal.segment_bytes == 64 * 2**20
    assert cfg.router.journal.retain == 7 * 86400
    assert cfg.router.max_event_bytes == 2**20
    assert "console" in cfg.workers
    assert cfg.workers["console"].retry.backoff == [1, 2, 4]
    assert cfg.producers["heartbeat"].every == 10
    assert cfg.publish.startswith("ipc://" + cfg.data_dir)


def test_repo_development_overlay():
    cfg = config.load(DEFAULT, env="development")
    assert cfg.log.level == "debug"
    assert cfg.router.journal.fsync == "never"
    assert cfg.router.journal.segment_bytes == 64 * 2**20  # kept from the base


def test_repo_production_overlay(monkeypatch):
    monkeypatch.setenv("NEXUS_ENV", "production")
    cfg = config.load(DEFAULT)
    assert cfg.log.format == "json"
    assert cfg.router.journal.fsync == "always"
    assert cfg.router.journal.retain == 14 * 86400
    assert cfg.router.rate_limits.default.rate == 5000
    assert cfg.router.rate_limits.sources["parrot"].burst == 200
    assert "console" in cfg.workers
