"""Preflight: the refusals that keep `trustdb daemon --mode enforce` from locking a machine up.
Real LMDB databases and the real files of this machine; nothing is loaded or attached."""

from __future__ import annotations

import sys
from pathlib import Path

from trustdb.db import TrustDB
from trustdb.service import preflight
from trustdb.walk import scan


def test_missing_database_is_refused(tmp_path: Path) -> None:
    line = preflight.refusal(tmp_path / "nope")
    assert line is not None and line.startswith("refusing to enforce: no usable trust database")


def test_empty_database_is_refused(tmp_path: Path) -> None:
    TrustDB.open(tmp_path / "db", write=True).close()
    line = preflight.refusal(tmp_path / "db")
    assert line is not None and "empty" in line and "\n" not in line


def test_untrusted_service_is_listed_then_accepted(tmp_path: Path) -> None:
    db = tmp_path / "db"
    with TrustDB.open(db, write=True) as t:
        t.add_entries("manual", "manual", scan(["/bin/true"]))
    problem, findings = preflight.check(db)
    assert problem is None
    paths = {f.path for f in findings}
    import os

    assert os.path.realpath(sys.executable) in paths  # the service's own interpreter
    assert any("libc.so" in p for p in paths)  # and what it maps
    line = preflight.refusal(db)
    assert line is not None and "service preflight" in line
    # Trust exactly what was listed: then it is safe to switch on.
    with TrustDB.open(db, write=True) as t:
        t.add_entries("manual", "manual", scan(sorted(paths)))
    assert preflight.check(db) == (None, [])
    assert preflight.refusal(db) is None


def test_elf_dependencies_resolve_interpreter_and_libraries() -> None:
    deps = preflight.elf_dependencies("/bin/sh")
    assert any("ld-linux" in d for d in deps) and any("libc.so" in d for d in deps)
    assert preflight.elf_dependencies("/etc/passwd") == []


def test_finding_line_gives_the_command() -> None:
    f = preflight.Finding("/usr/bin/bash", "login shells")
    assert f.line() == ("/usr/bin/bash: not trusted (needed for login shells); "
                        "trustdb trust /usr/bin/bash")
