"""`trustdb run` re-execs itself under `python -I` before the CLI's imports (trustdb.isolation):
a module planted on PYTHONPATH (what a tree could leave for the next unconfined start) is
never imported by the supervisor, and the re-exec costs one bare interpreter, not the CLI twice.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.engine import test_run as base
from trustdb.isolation import verb_of

trusted_db = base.trusted_db
REPO = Path(__file__).resolve().parents[2]


@pytest.mark.parametrize(("args", "verb"), [
    (["run", "--", "true"], "run"),
    (["--db", "/x", "run", "--", "true"], "run"),
    (["--db=/x", "-q", "run", "true"], "run"),
    (["--json", "status"], "status"),
    (["--db", "run"], None),  # "run" is the value of --db here
    (["--", "run"], None),
    ([], None),
])
def test_verb_of(args: list[str], verb: str | None) -> None:
    assert verb_of(args) == verb


def _planted(tmp_path: Path) -> tuple[Path, Path]:
    """A directory with typer.py and blake3.py that leave a mark when imported."""
    evil = tmp_path / "evil"
    evil.mkdir()
    marker = tmp_path / "imported"
    for name in ("typer", "blake3", "lmdb"):
        (evil / f"{name}.py").write_text(
            f"open({str(marker)!r}, 'a').write({name!r} + '\\n')\nraise ImportError('planted')\n")
    return evil, marker


@pytest.mark.root
@pytest.mark.bpf
def test_run_never_imports_from_pythonpath(trusted_db: Path, tmp_path: Path) -> None:
    evil, marker = _planted(tmp_path)
    env = dict(os.environ, PYTHONPATH=f"{evil}:{REPO}", TRUSTDB_RUN_DIR=str(tmp_path / "state"),
               TRUSTDB_LOG=str(tmp_path / "decisions.jsonl"))
    got = subprocess.run([sys.executable, "-c", "from trustdb.cli import main; main()", "run",
                          "--db", str(trusted_db), "--", "true"], env=env, capture_output=True, check=False,
                         text=True, timeout=120, cwd=tmp_path)
    assert got.returncode == 0, got.stderr
    assert not marker.exists(), marker.read_text()


def test_other_verbs_are_not_reexeced(tmp_path: Path) -> None:
    """The re-exec is for `run` only: other verbs keep the caller's interpreter (a planted
    module on PYTHONPATH is the caller's own choice there)."""
    evil, marker = _planted(tmp_path)
    env = dict(os.environ, PYTHONPATH=f"{evil}:{REPO}")
    got = subprocess.run([sys.executable, "-c", "from trustdb.cli import main; main()",
                          "--version"], env=env, capture_output=True, text=True, timeout=60,
                         check=False)
    assert got.returncode != 0 and "planted" in got.stderr
    assert marker.exists()
