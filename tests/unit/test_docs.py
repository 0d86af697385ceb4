"""The README and docs/ describe this repository only: no path outside it, every repo
path they name exists, and the architecture page has its data-path diagram."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
DOCS = sorted([REPO / "README.md", *(REPO / "docs").glob("*.md")])
ROOTS = ("nexus", "tests", "docs", "examples", "config", "bench", "workers", "protos", "scripts", "deploy")
FENCE = re.compile(r"^```.*?^```", re.MULTILINE | re.DOTALL)
INLINE = re.compile(r"`([^`\n]+)`")
# a repo path inside a backtick span: `nexus/router/`, `tests/unit/test_x.py`, the
# path in `python -m pytest tests/unit` or `config/default.yaml: workers...`
REPO_PATH = re.compile(rf"(?<![\w./{{}}-])((?:{'|'.join(ROOTS)})/[\w./*-]*)")
LINK = re.compile(r"\]\(([^)\s]+)\)")


def _ids(paths):
    return [str(p.relative_to(REPO)) for p in paths]


@pytest.mark.parametrize("doc", DOCS, ids=_ids(DOCS))
def test_nothing_points_outside_the_repo(doc):
    text = doc.read_text()
    for outside in ("../shared", "DESIGN.md", "/work/"):
        assert outside not in text, f"{doc.name} refers to {outside!r}, which a clone does not have"
    for target in LINK.findall(text):
        if re.match(r"[a-z]+:", target) or target.startswith("#"):
            continue  # a URL or an anchor
        path = (doc.parent / target.split("#")[0]).resolve()
        assert path.is_relative_to(REPO), f"{doc.name} links outside the repo: {target}"
        assert path.exists(), f"{doc.name} links to {target}, which does not exist"


def repo_paths(text: str) -> set[str]:
    """Repo paths named in inline backtick spans (code blocks show commands and config)."""
    found = set()
    for span in INLINE.findall(FENCE.sub("", text)):
        found |= {p.rstrip(".") for p in REPO_PATH.findall(span)}
    return found


def test_repo_paths_are_found_in_backticks():
    text = "see `nexus/router/`, `python -m pytest tests/unit -q`, `config/default.yaml: x: unknown key`"
    text += " and `docs/failure-modes-*.md`, not `data_dir/run/box/` nor `ipc://{data_dir}/run/coord`"
    text += "\n```\nnexus/not/checked.py\n```\n"
    assert repo_paths(text) == {"nexus/router/", "tests/unit", "config/default.yaml", "docs/failure-modes-*.md"}


@pytest.mark.parametrize("doc", DOCS, ids=_ids(DOCS))
def test_every_repo_path_named_exists(doc):
    missing = sorted(p for p in repo_paths(doc.read_text()) if not any(REPO.glob(p.rstrip("/"))))
    assert not missing, f"{doc.name} names paths that do not exist: {missing}"


def test_every_module_of_the_folder_map_exists():
    """`server.py` under **`nexus/router/`** means nexus/router/server.py."""
    package, named = None, []
    for line in (REPO / "docs" / "ARCHITECTURE.md").read_text().splitlines():
        heading = re.match(r"\*\*`([\w/]+/)`\*\*", line)
        if heading:
            package = heading.group(1)
        elif line.startswith(("#", "**")):  # another section or paragraph heading
            package = None
        if package:
            named += [package + m for m in re.findall(r"`(\w+\.py)`", line)]
    assert "nexus/router/server.py" in named and "workers/webhook.py" in named
    missing = [path for path in named if not (REPO / path).is_file()]
    assert not missing, f"docs/ARCHITECTURE.md names modules that do not exist: {missing}"


def test_architecture_has_a_mermaid_data_path():
    text = (REPO / "docs" / "ARCHITECTURE.md").read_text()
    block = re.search(r"^```mermaid\n(.*?)^```", text, re.MULTILINE | re.DOTALL)
    assert block, "docs/ARCHITECTURE.md has no ```mermaid block"
    diagram = block.group(1)
    assert diagram.startswith("flowchart")
    for part in ("ingest", "confirm", "intake", "journal", "publish", "coord", "control", "DeadLetter"):
        assert part in diagram, f"the data-path diagram does not show {part}"


def test_readme_links_the_architecture_page():
    readme = (REPO / "README.md").read_text()
    assert "(docs/ARCHITECTURE.md)" in readme
    layout = readme[readme.index("\n## Layout\n") :]
    assert "docs/ARCHITECTURE.md" in layout and "pytest -m unit" in layout
