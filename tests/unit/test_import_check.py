"""The reload's handler import check (nexus/supervisor/importcheck.py): a real `python -c`
process imports each group's handler from the config's folder, as a spawned member would."""

from __future__ import annotations

from nexus import config
from nexus.supervisor import importcheck


def test_handlers_are_imported_next_to_the_config_in_a_separate_process(tmp_path):
    (tmp_path / "app_ok.py").write_text("def handle(event, ctx):\n    pass\n")
    (tmp_path / "app_broken.py").write_text("raise RuntimeError('no database')\n")
    (tmp_path / "app_exits.py").write_text("import sys\nsys.exit(7)\n")
    groups = {
        "good": "app_ok:handle",
        "missing": "app_ok:nope",
        "broken": "app_broken:handle",
        "absent": "no_such_module_here:f",
    }
    cfg = config.Config(
        workers={g: config.WorkerGroupConfig(handler=h) for g, h in groups.items()},
        source=str(tmp_path / "nexus.yaml"),
    )
    assert importcheck.check(cfg, ["good"]) == ""
    assert importcheck.check(cfg, []) == ""  # nothing to start: no process at all
    error = importcheck.check(cfg, ["good", "missing", "broken", "absent"])
    assert "\n" not in error and "group good" not in error
    assert "group missing: handler app_ok:nope: app_ok has no attribute 'nope'" in error
    assert "group broken: handler app_broken:handle: cannot import app_broken: RuntimeError: no database" in error
    assert "group absent: handler no_such_module_here:f: cannot import no_such_module_here" in error
    exits = config.Config(workers={"x": config.WorkerGroupConfig(handler="app_exits:f")}, source=cfg.source)
    assert importcheck.check(exits, ["x"]) == "group x: the handler import check failed: exit code 7"
    contracts = config.Config(contracts=["app_broken"], workers=cfg.workers, source=cfg.source)
    assert importcheck.check(contracts, ["good"]).startswith("contracts: cannot import app_broken: RuntimeError")
