"""Before a reload starts members on an added or changed group: do their handlers import?

A member that cannot import its handler exits with a config error; found only during a
rolling restart, that costs a drained member, and every later crash-restart of the
others fails the same way. So the reloader first imports each such group's handler (and
the contract modules every member loads) in one short-lived `python -c` process with the
module paths a spawned member has: the launcher's sys.path plus the config's module
paths (config.module_paths). Not in the launcher itself: a module it imported before the
edit would answer from its cache, an import's side effects would land in the supervisor,
and an import that hangs costs a timeout here, not a stuck launcher.

Only importing: a handler class is not instantiated (its __init__ runs in the member).
"""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Iterable

from nexus.config import Config, module_paths

TIMEOUT = 20.0  # seconds for the whole check (an interpreter start and the imports)
MARK = "nexus-import-check: "  # the answer's line; a handler may print at import too

# runs in the check process: argv[1] is [sys.path, {group: handler}, contract modules]
SCRIPT = f"""
import json, sys
paths, handlers, contracts = json.loads(sys.argv[1])
sys.path[:] = paths
from nexus.errors import NexusError
from nexus.member.handlers import find_handler
from nexus.protocol.events import load_contract_modules
errors = {{}}
try:
    load_contract_modules(contracts)
except NexusError as exc:
    errors[""] = str(exc)  # (it names the contracts already)
for group, spec in handlers.items():
    try:
        find_handler(spec)
    except NexusError as exc:
        errors["group " + group] = str(exc)
print("\\n{MARK}" + json.dumps(errors), flush=True)
"""


def check(cfg: Config, groups: Iterable[str]) -> str:
    """'' when the handler of every group in `groups` (of `cfg`, the config new members
    get) and cfg's contract modules import; otherwise one line naming what does not."""
    names = sorted(groups)
    if not names:
        return ""
    paths = list(sys.path) + [p for p in module_paths(cfg) if p not in sys.path]
    request = json.dumps([paths, {g: cfg.workers[g].handler for g in names}, list(cfg.contracts)])
    what = f"group{'s' if len(names) > 1 else ''} {', '.join(names)}"
    try:
        done = subprocess.run(
            [sys.executable, "-c", SCRIPT, request],
            stdin=subprocess.DEVNULL,
            capture_output=True,
            text=True,
            timeout=TIMEOUT,
        )
    except subprocess.TimeoutExpired:
        return f"{what}: importing the handler did not finish within {TIMEOUT:g}s (an import that hangs?)"
    except OSError as exc:
        return f"{what}: cannot run the handler import check: {exc}"
    answers = [line for line in done.stdout.splitlines() if line.startswith(MARK)]
    if not answers:  # the check process itself died (a module calling sys.exit, say)
        last = (done.stderr.strip().splitlines() or [f"exit code {done.returncode}"])[-1]
        return f"{what}: the handler import check failed: {last}"
    errors: dict[str, str] = json.loads(answers[-1][len(MARK) :])
    lines = [(f"{where}: " if where else "") + " ".join(error.split()) for where, error in sorted(errors.items())]
    return "; ".join(lines)
