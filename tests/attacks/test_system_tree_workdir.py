"""A workdir or --allow-write path inside a system tree (/opt/proj, /usr/local/src/proj), host,
tracepoint backend. Inside the system trees the first-seen handler neither watches trusted
files' write opens nor judges data as possible scripts, and their read-only mounts are what
stops chmod/setxattr of host binaries: a writable grant there would switch all of that off
for the tree's own files. `run` refuses such a grant with one line, before anything starts.
"""

from __future__ import annotations

import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.engine.test_run import TRUSTDB

pytestmark = [pytest.mark.root, pytest.mark.bpf]

MARK = "UNTRUSTED-SCRIPT-RAN"


@pytest.fixture(params=["/opt", "/usr/local/src"])
def system_project(request: pytest.FixtureRequest) -> Iterator[Path]:
    parent = Path(request.param)
    made = not parent.exists()
    parent.mkdir(parents=True, exist_ok=True)
    proj = Path(tempfile.mkdtemp(prefix="td-proj-", dir=parent))
    try:
        (proj / "evil").write_text(f'print("{MARK}")\n')
        yield proj
    finally:
        shutil.rmtree(proj, ignore_errors=True)
        if made:
            shutil.rmtree(parent, ignore_errors=True)


def _run(db: Path, env: dict[str, str], cwd: Path, *extra: str) -> subprocess.CompletedProcess:
    return subprocess.run([*TRUSTDB, "run", "--db", str(db), *extra, "--", "sh", "-c",
                           "cat evil; /usr/bin/python3 evil"], env=env, cwd=cwd, check=False,
                          capture_output=True, text=True, timeout=120)


def test_workdir_in_a_system_tree_is_refused(interpreters_db: Path, run_env: dict[str, str],
                                             system_project: Path) -> None:
    got = _run(interpreters_db, run_env, system_project)
    assert MARK not in got.stdout.replace(f'print("{MARK}")', ""), (got.stdout, got.stderr)
    assert got.returncode != 0
    assert "system tree" in got.stderr and "Traceback" not in got.stderr, got.stderr


def test_allow_write_in_a_system_tree_is_refused(interpreters_db: Path, run_env: dict[str, str],
                                                 system_project: Path, tmp_path: Path) -> None:
    got = _run(interpreters_db, run_env, tmp_path, "--allow-write", str(system_project))
    assert got.returncode != 0, (got.stdout, got.stderr)
    assert "system tree" in got.stderr and "Traceback" not in got.stderr, got.stderr


def test_run_says_it_does_not_trust_compiler_outputs(interpreters_db: Path,
                                                     run_env: dict[str, str],
                                                     tmp_path: Path) -> None:
    """The build policy sets trust_outputs, which only the service applies: `run` says so."""
    got = subprocess.run([*TRUSTDB, "run", "--db", str(interpreters_db), "--policy", "build",
                          "--", "true"], env=run_env, cwd=tmp_path, check=False,
                         capture_output=True, text=True, timeout=120)
    assert got.returncode == 0, got.stderr
    assert "trust_outputs, which only the service applies" in got.stderr, got.stderr
