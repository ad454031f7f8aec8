"""The declared dependencies are exactly what the code imports; the lock pins each of them;
requires-python names the interpreters the suite runs on."""

from __future__ import annotations

import ast
import sys
import tomllib
from pathlib import Path

from tests.conftest import REPO

IMPORT_NAME = {"python-debian": "debian", "inotify-simple": "inotify_simple"}
"""Distributions whose import name differs from the project name."""


def _requirement_name(spec: str) -> str:
    name = spec
    for sep in "<>=!~[; ":
        name = name.split(sep, 1)[0]
    return name.strip().lower()


def _optional_imports(tree: ast.AST) -> set[int]:
    """ids of import nodes inside `try: ... except ImportError:` (optional, with a fallback)."""
    optional: set[int] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Try) and any(
            isinstance(h.type, ast.Name) and h.type.id in ("ImportError", "ModuleNotFoundError")
            for h in node.handlers
        ):
            optional.update(id(n) for stmt in node.body for n in ast.walk(stmt))
    return optional


def third_party_imports(*roots: Path) -> set[str]:
    """Top-level modules imported anywhere under roots that are neither stdlib nor ours
    (optional imports with an ImportError fallback, such as systemd's journal, excepted)."""
    ours = {"trustdb", "trustdb_importers", "importers"}
    found: set[str] = set()
    for root in roots:
        for path in root.rglob("*.py"):
            tree = ast.parse(path.read_text(), str(path))
            optional = _optional_imports(tree)
            for node in ast.walk(tree):
                if id(node) in optional:
                    continue
                if isinstance(node, ast.Import):
                    names = [a.name for a in node.names]
                elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                    names = [node.module]
                else:
                    continue
                for n in names:
                    top = n.split(".", 1)[0]
                    if top not in sys.stdlib_module_names and top not in ours:
                        found.add(top)
    return found


def project() -> dict[str, object]:
    return tomllib.loads((REPO / "pyproject.toml").read_text())["project"]


def test_declared_dependencies_are_the_imported_ones() -> None:
    declared = {_requirement_name(d) for d in project()["dependencies"]}  # type: ignore[union-attr]
    as_imported = {IMPORT_NAME.get(d, d) for d in declared}
    imported = third_party_imports(REPO / "trustdb", REPO / "importers")
    assert imported == as_imported, (
        f"imported but not declared: {sorted(imported - as_imported)}; "
        f"declared but never imported: {sorted(as_imported - imported)}"
    )


def test_the_lock_pins_every_dependency() -> None:
    lock = (REPO / "packaging/requirements.lock").read_text().splitlines()
    pinned = {line.split("==", 1)[0] for line in lock if line and not line.startswith("#")}
    assert all("--hash=sha256:" in x for x in lock if x and not x.startswith("#"))
    declared = {_requirement_name(d) for d in project()["dependencies"]}  # type: ignore[union-attr]
    assert declared <= pinned, f"not pinned: {sorted(declared - pinned)}"


def test_requires_python_matches_the_tested_interpreters() -> None:
    """The suite runs on 3.11.7 (pyenv) and Debian 12's 3.11.2 (tests/test_packaging.py runs
    the packaged CLI on /usr/bin/python3); pyproject says exactly that range."""
    assert project()["requires-python"] == ">=3.11.2,<3.12"
    assert sys.version_info[:2] == (3, 11)
