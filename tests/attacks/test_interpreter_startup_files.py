"""Interpreters that run code from files they load at start-up, which no script rule judges
(issue 10, section 3), tracepoint backend: a trusted command runs untrusted code.

- bash runs the file named by $BASH_ENV before any non-interactive script or `bash -c`;
- python runs `import` lines of every `.pth` file in its site directories, and the user site
  is wherever $PYTHONUSERBASE says (a `.pth` is no script suffix).
Neither file is named on the command line, has a script suffix or needs a `#!` line.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.engine.test_run import run_confined, workdir_of

pytestmark = [pytest.mark.root, pytest.mark.bpf]

MARK = "UNTRUSTED-STARTUP-CODE-RAN"


def test_bash_env(interpreters_db: Path, run_env: dict[str, str]) -> None:
    (workdir_of(run_env) / "envdata").write_text(f"echo {MARK}\n")
    got = run_confined(interpreters_db, "BASH_ENV=./envdata bash -c true", run_env)
    assert MARK not in got.out, got.out


def test_python_pth_in_user_site(interpreters_db: Path, run_env: dict[str, str]) -> None:
    site = workdir_of(run_env) / "ub" / "lib" / "python3.11" / "site-packages"
    site.mkdir(parents=True)
    (site / "evil.pth").write_text(f'import sys; print("{MARK}")\n')
    got = run_confined(interpreters_db,
                       "PYTHONUSERBASE=$PWD/ub /usr/bin/python3 -m json.tool /dev/null", run_env)
    assert MARK not in got.out, got.out


@pytest.mark.parametrize("shell, rc, command", [
    ("bash", ".bash_profile", "bash -l -c true"),
    ("bash", ".profile", "bash --login -c true"),
    ("bash", ".bashrc", "bash -i -c true"),
    ("sh", ".profile", "sh -l -c true"),
])
def test_shell_rc_files_of_a_home_the_tree_chose(interpreters_db: Path, run_env: dict[str, str],
                                                 shell: str, rc: str, command: str) -> None:
    """A login or interactive shell runs its rc files from $HOME, which the tree sets to a
    directory it writes: untrusted code no command line names (like $BASH_ENV)."""
    home = workdir_of(run_env) / "home"
    home.mkdir()
    (home / rc).write_text(f"echo {MARK}\n")
    got = run_confined(interpreters_db, f"HOME={home} {command} </dev/null", run_env)
    assert MARK not in got.out, (shell, got.out, got.err)
