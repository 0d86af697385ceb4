"""What a newcomer meets first (issue 11, point 6): the names and keys the README
promises exist, every key and option is documented, import errors are one line."""

from __future__ import annotations

import re
import socket
import sys
from pathlib import Path

import msgspec
import pytest

import nexus
from nexus import config
from nexus.cli import commands as cli
from nexus.errors import ConfigError
from nexus.member.handlers import load_handler
from nexus.protocol import transport
from nexus.testing import free_port

README = (Path(__file__).resolve().parents[2] / "README.md").read_text()


def section(title: str) -> str:
    start = README.index(f"\n## {title}\n")
    end = README.find("\n## ", start + 1)
    return README[start : end if end > 0 else None]


# -- exports ----------------------------------------------------------------------------
def test_every_nexus_name_the_readme_uses_exists():
    names = set(re.findall(r"\bnexus\.([A-Z]\w*)", README))  # nexus.PermanentError
    for imported in re.findall(r"^from nexus import (.+)$", README, re.MULTILINE):  # from nexus import A, B
        names |= {n.strip() for n in imported.split(",")}
    assert {"PermanentError", "DependencyError", "Producer", "Event", "Context"} <= names
    missing = sorted(n for n in names if not hasattr(nexus, n))
    assert not missing, f"README names nexus.{missing} but nexus does not export them"


def test_every_nexus_module_and_attribute_the_readme_names_exists():
    import importlib

    for dotted in sorted(set(re.findall(r"`(?:python -m )?(nexus(?:\.\w+)+)", README))):
        parts = dotted.split(".")
        obj, n = importlib.import_module("nexus"), 1
        while n < len(parts):  # the longest importable module (a package's attribute is
            try:  # there only once its submodule was imported: import, don't ask hasattr)
                obj = importlib.import_module(".".join(parts[: n + 1]))
            except ModuleNotFoundError:
                break
            n += 1
        for attr in parts[n:]:
            assert hasattr(obj, attr), f"README names {dotted}, which does not exist"
            obj = getattr(obj, attr)


def test_handler_errors_are_importable_from_the_top_level():
    from nexus import DependencyError, NexusError, PermanentError

    assert issubclass(PermanentError, NexusError) and issubclass(DependencyError, NexusError)
    assert {"PermanentError", "DependencyError"} <= set(nexus.__all__)


# -- every config key and CLI option is in the README ----------------------------------------
def _struct_keys(tp, seen=None) -> set[str]:
    seen = set() if seen is None else seen
    keys: set[str] = set()
    info = msgspec.inspect.type_info(tp)

    def walk(t):
        if isinstance(t, msgspec.inspect.StructType):
            if t.cls in seen:
                return
            seen.add(t.cls)
            if t.tag_field:
                keys.add(t.tag_field)
            for f in t.fields:
                keys.add(f.encode_name)
                walk(f.type)
        elif isinstance(t, msgspec.inspect.UnionType):
            for sub in t.types:
                walk(sub)
        elif isinstance(t, (msgspec.inspect.DictType,)):
            walk(t.value_type)
        elif isinstance(t, (msgspec.inspect.ListType,)):
            walk(t.item_type)
        elif isinstance(t, msgspec.inspect.Metadata):
            walk(t.type)

    walk(info)
    return keys


def test_readme_lists_every_config_key():
    # the producers' keys are the built-in kinds' Config structs (sources are plugins)
    structs = [config.Config] + [config.source_class(kind).Config for kind in config.BUILTIN_SOURCES]
    keys = set().union(*(_struct_keys(s) for s in structs)) - {"source"}  # source: set by load(), not a key
    assert {"max_batch", "heartbeat_misses", "create_missing", "idle_timeout", "kind"} <= keys
    text = section("Configuration")
    missing = sorted(k for k in keys if not re.search(rf"(?<![\w.]){re.escape(k)}:", text))
    assert not missing, f"config keys missing from README ## Configuration: {missing}"


def _options(parser) -> set[str]:
    return {
        o
        for a in parser._actions
        for o in a.option_strings
        if o.startswith("--") and o not in ("--help", "--config", "--env")
    }


def test_readme_lists_every_cli_option():
    text = section("Command line")
    sub = next(a for a in cli.build_parser()._actions if a.choices and isinstance(a.choices, dict))
    missing = []
    for name, parser in sub.choices.items():
        rows = " ".join(line for line in text.splitlines() if line.startswith(f"| `nexus {name}"))
        assert rows, f"no README row for `nexus {name}`"
        missing += [f"nexus {name} {o}" for o in sorted(_options(parser)) if o not in rows]
    assert not missing, f"CLI options missing from README ## Command line: {missing}"
    assert "`-c FILE`" in text and "`--env NAME`" in text
    assert "`python -m nexus.launch [-c FILE] [--env NAME]`" in text  # its only options


@pytest.mark.parametrize(
    "argv",
    [
        ["-c", "F", "status"],
        ["status", "-c", "F"],
        ["--config", "F", "status", "--json"],
        ["--env", "E", "-c", "F", "dlq", "list"],
        ["dlq", "list", "--env", "E", "-c", "F"],
    ],
)
def test_config_and_env_before_or_after_the_command(argv):
    args = cli.build_parser().parse_args(argv)
    assert args.config == "F"
    assert args.env == ("E" if "--env" in argv else None)


def test_config_after_the_command_wins_over_before():
    assert cli.build_parser().parse_args(["-c", "A", "status", "-c", "B"]).config == "B"


# -- handler and contract import errors --------------------------------------------------------
def test_a_module_raising_at_import_is_one_config_error_line(tmp_path, monkeypatch):
    (tmp_path / "raises_at_import.py").write_text("x = 1\n\ndef f():\n    raise KeyError('API_KEY')\n\nf()\n")
    (tmp_path / "bad_syntax_mod.py").write_text("def handle(:\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    with pytest.raises(ConfigError) as err:
        load_handler("raises_at_import:handle", {})
    text = str(err.value)
    assert "\n" not in text and "KeyError: 'API_KEY'" in text
    assert f"{tmp_path / 'raises_at_import.py'}:4" in text
    with pytest.raises(ConfigError) as err:
        load_handler("bad_syntax_mod:handle", {})
    assert "SyntaxError" in str(err.value) and f"{tmp_path / 'bad_syntax_mod.py'}:1" in str(err.value)
    with pytest.raises(ConfigError) as err:
        load_handler("no_such_module_anywhere:handle", {})
    assert str(err.value).endswith("No module named 'no_such_module_anywhere'")
    sys.modules.pop("raises_at_import", None)


def test_a_contract_module_raising_at_import_is_a_config_error(tmp_path, monkeypatch):
    (tmp_path / "raising_contracts.py").write_text("raise ValueError('bad contract table')\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    from nexus.protocol.events import load_contract_modules

    with pytest.raises(
        ConfigError,
        match=r"contracts: cannot import raising_contracts: ValueError: "
        r"bad contract table \(at .*raising_contracts.py:1\)",
    ):
        load_contract_modules(["raising_contracts"])


# -- module discovery ---------------------------------------------------------------------------
def test_config_folder_and_cwd_are_appended_to_sys_path(tmp_path, monkeypatch):
    path = tmp_path / "conf" / "nexus.yaml"
    path.parent.mkdir()
    path.write_text("data_dir: ./var\n")
    cfg = config.load(path)
    monkeypatch.setattr(sys, "path", ["/first"])
    monkeypatch.chdir(tmp_path)
    config.add_module_paths(cfg)
    assert sys.path == ["/first", str(tmp_path), str(path.parent)]  # appended: nothing is shadowed
    config.add_module_paths(cfg)
    assert len(sys.path) == 3


# -- the reachability probe ----------------------------------------------------------------------
def test_probe_tells_nothing_listens_from_something_listens(tmp_path):
    assert "no socket file" in transport.unreachable(f"ipc://{tmp_path}/missing")
    stale = tmp_path / "stale"
    s = socket.socket(socket.AF_UNIX)
    s.bind(str(stale))
    s.close()  # a socket file left by a dead process
    assert transport.unreachable(f"ipc://{stale}") == "connection refused"
    port = free_port()
    assert transport.unreachable(f"tcp://127.0.0.1:{port}") == "connection refused"
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", port))
        listener.listen()
        assert transport.unreachable(f"tcp://127.0.0.1:{port}") is None
        assert transport.unreachable(f"tcp://*:{port}") is None
    assert transport.unreachable("inproc://x") is None
