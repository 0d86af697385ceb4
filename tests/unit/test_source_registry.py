"""Source kinds are plugins (issue 11, point 3): `producers:` entries are decoded through
the `nexus.sources` entry points, with errors worded like every other config error."""

from __future__ import annotations

import sys
import tomllib
from pathlib import Path

import pytest

import nexus.sources
from nexus import config
from nexus.errors import ConfigError
from nexus.sources.file import FileConfig
from nexus.sources.imap import ImapConfig
from nexus.sources.schedule import ScheduleConfig

REPO = Path(__file__).resolve().parents[2]

PLUGIN = """
from nexus.errors import ConfigError
from nexus.sources import Duration, Source, SourceConfig


class LevelConfig(SourceConfig):
    level: int
    every: Duration = Duration(1)


class LevelSource(Source[LevelConfig]):
    Config = LevelConfig

    @classmethod
    def check(cls, name, spec, config):
        if spec.level > 10:
            raise ConfigError(f"producers.{name}.level: {spec.level} is too loud (at most 10)")


def not_a_source():
    pass
"""


@pytest.fixture
def plugin(tmp_path, monkeypatch):
    """Registers `kind` -> `module:attr` as an installed package would (a dist-info
    folder with entry_points.txt on sys.path), with `code` as the module."""
    site = tmp_path / "site"
    site.mkdir()
    monkeypatch.syspath_prepend(str(site))
    modules: list[str] = []

    def register(kinds: dict[str, str], module: str, code: str = PLUGIN) -> None:
        (site / f"{module}.py").write_text(code)
        info = site / f"{module}-0.1.dist-info"
        info.mkdir()
        (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {module}\nVersion: 0.1\n")
        (info / "entry_points.txt").write_text(
            "[nexus.sources]\n" + "".join(f"{kind} = {target}\n" for kind, target in kinds.items())
        )
        modules.append(module)

    yield register
    for module in modules:
        sys.modules.pop(module, None)


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "nexus.yaml"
    path.write_text(text)
    return path.resolve()


def load_error(path: Path) -> str:
    with pytest.raises(ConfigError) as err:
        config.load(path)
    return str(err.value)


# -- the built-in kinds ----------------------------------------------------------------------
def test_builtins_register_in_pyproject_as_the_fallback_says():
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    assert project["entry-points"]["nexus.sources"] == config.BUILTIN_SOURCES
    assert {"file", "imap", "schedule"} <= set(nexus.sources.kinds())


def test_builtin_entries_decode_into_their_kinds_config_and_survive_the_handover(tmp_path):
    path = write(
        tmp_path,
        "producers:\n"
        "  tick: {kind: schedule, every: 10s}\n"
        "  drop: {kind: file, paths: [./in], debounce: 50ms}\n"
        "  mail: {kind: imap, host: h, username: u, idle_timeout: 20m}\n",
    )
    cfg = config.load(path)
    assert cfg.producers["tick"] == ScheduleConfig(kind="schedule", every=config.Duration(10))
    assert cfg.producers["drop"] == FileConfig(kind="file", paths=["./in"], debounce=config.Duration(0.05))
    assert cfg.producers["mail"] == ImapConfig(kind="imap", host="h", username="u", idle_timeout=config.Duration(1200))
    handed = config.from_bytes(config.to_bytes(cfg))  # what the router gets on reload
    assert handed == cfg and config.needs_restart(cfg, handed) == []


def test_unknown_kind_names_the_installed_kinds(tmp_path):
    path = write(tmp_path, "producers: {tick: {kind: teleport}}\n")
    installed = ", ".join(nexus.sources.kinds())
    assert load_error(path) == f"{path}: producers.tick.kind: unknown kind 'teleport' (installed: {installed})"


@pytest.mark.parametrize(
    "entry,message",
    [
        ("{every: 1s}", "producers.tick.kind: required key is missing"),
        ("{kind: 5}", "producers.tick.kind: Expected `str`, got `int`"),
        ("5", "producers.tick: Expected `object`, got `int`"),
    ],
)
def test_a_bad_kind_is_named_like_any_key(tmp_path, entry, message):
    path = write(tmp_path, f"producers: {{tick: {entry}}}\n")
    assert load_error(path) == f"{path}: {message}"


# -- a kind from another package -------------------------------------------------------------
def test_a_plugin_kind_is_configured_like_a_builtin(tmp_path, plugin):
    plugin({"level": "level_plugin:LevelSource"}, "level_plugin")
    assert "level" in nexus.sources.kinds()
    cfg = config.load(write(tmp_path, "producers: {p: {kind: level, level: 3, every: 250ms}}\n"))
    spec = cfg.producers["p"]
    assert type(spec).__name__ == "LevelConfig" and (spec.kind, spec.level, spec.every) == ("level", 3, 0.25)
    assert config.from_bytes(config.to_bytes(cfg)) == cfg


@pytest.mark.parametrize(
    "entry,message",
    [
        ("{kind: level, level: 3, evry: 1s}", "producers.p.evry: unknown key"),
        ("{kind: level}", "producers.p.level: required key is missing"),
        ("{kind: level, level: x}", "producers.p.level: Expected `int`, got `str`"),
        ("{kind: level, level: 3, every: soon}", "producers.p.every: 'soon' is not a duration"),
        ("{kind: level, level: 11}", "producers.p.level: 11 is too loud (at most 10)"),  # its check()
    ],
)
def test_a_plugin_option_error_is_one_line_naming_the_key(tmp_path, plugin, entry, message):
    plugin({"level": "level_plugin:LevelSource"}, "level_plugin")
    path = write(tmp_path, f"producers: {{p: {entry}}}\n")
    msg = load_error(path)
    assert msg.startswith(f"{path}: {message}") and "\n" not in msg


def test_a_plugin_that_fails_to_import_is_one_line(tmp_path, plugin):
    plugin({"broken": "broken_plugin:Source"}, "broken_plugin", "raise RuntimeError('no licence key')\n")
    path = write(tmp_path, "producers: {p: {kind: broken}}\n")
    assert load_error(path) == (
        f"{path}: producers.p.kind: cannot load kind 'broken' (broken_plugin:Source): "
        f"RuntimeError: no licence key (at {tmp_path / 'site' / 'broken_plugin.py'}:1)"
    )


def test_an_entry_point_that_is_not_a_source_is_refused(tmp_path, plugin):
    plugin({"odd": "odd_plugin:not_a_source"}, "odd_plugin")
    path = write(tmp_path, "producers: {p: {kind: odd}}\n")
    assert load_error(path) == (
        f"{path}: producers.p.kind: kind 'odd' (odd_plugin:not_a_source) is not a source: "
        "it needs a Config subclassing SourceConfig"
    )
