"""Interpreters loading untrusted script files (issue 10, section 3), tracepoint backend.

The first-seen handler judges a file an interpreter opens as a script when its name has a
script suffix, it starts with `#!`, or it *is* (same st_dev, st_ino) a file the interpreter's
command line or environment names as code, resolved inside the tree (`trustdb.script_args`):
a symlink, /dev/fd/N or /proc/self/fd/N reach the same file and are judged alike. Each attack
plants an untrusted script (no `#!`, no script suffix) in the workdir and runs it inside
`trustdb run`; the script prints a marker, so the test sees whether untrusted code ran.
"""

from __future__ import annotations

import zipfile
from pathlib import Path

import pytest

from tests.engine.test_run import run_confined, workdir_of

pytestmark = [pytest.mark.root, pytest.mark.bpf]

MARK = "UNTRUSTED-SCRIPT-RAN"
PYTHON = "/usr/bin/python3"


def _plant(workdir: Path) -> None:
    """Untrusted scripts with names no rule matches, and symlinks to them."""
    (workdir / "evil.data").write_text(f'print("{MARK}")\n')
    (workdir / "evil.shdata").write_text(f"echo {MARK}\n")
    (workdir / "evil.pdata").write_text(f'print "{MARK}\\n";\n')
    (workdir / "evil.awkdata").write_text(f'BEGIN {{ print "{MARK}" }}\n')
    for link, target in (("pylink", "evil.data"), ("shlink", "evil.shdata"),
                         ("plink", "evil.pdata")):
        (workdir / link).symlink_to(target)
    with zipfile.ZipFile(workdir / "evil.zip", "w") as z:
        z.writestr("evilmod.py", f'print("{MARK}")\n')


def _attack(db: Path, env: dict[str, str], script: str) -> str:
    _plant(workdir_of(env))
    got = run_confined(db, script, env)
    return got.out + got.err


def test_named_script_is_refused(interpreters_db: Path, run_env: dict[str, str]) -> None:
    """Control: the same untrusted files, named directly, are refused, while the trusted
    stdlib loads (so the holes below are not an interpreter failing to start)."""
    out = _attack(interpreters_db, run_env,
                  f"{PYTHON} -c 'import json, email; print(\"stdlib-ok\")'; "
                  f"{PYTHON} evil.data; bash evil.shdata; sh evil.shdata; perl evil.pdata")
    assert "stdlib-ok" in out
    assert MARK not in out


def test_data_files_stay_readable(interpreters_db: Path, run_env: dict[str, str]) -> None:
    """Control: what an interpreter reads as data (an operand after its script, a `<`
    redirection, a module's input) is not judged, so the rule does not break ordinary work."""
    wd = workdir_of(run_env)
    (wd / "data.json").write_text('{"a": 1}\n')
    (wd / "lines.txt").write_text("one\ntwo\n")
    got = run_confined(interpreters_db,
                       f"{PYTHON} -m json.tool data.json && "
                       "while read l; do echo got-$l; done < lines.txt && "
                       "awk '{print \"awk-\" $0}' lines.txt && perl -ne 'print \"perl-$_\"' lines.txt",
                       run_env)
    assert '"a": 1' in got.out and "got-two" in got.out, (got.out, got.err)
    assert "awk-one" in got.out and "perl-two" in got.out, (got.out, got.err)


def test_denial_names_the_script(interpreters_db: Path, run_env: dict[str, str]) -> None:
    """The refused script is named on the confined command's own stderr, with the reason."""
    out = _attack(interpreters_db, run_env, f"{PYTHON} pylink")
    assert MARK not in out
    assert "denied script load" in out and "evil.data" in out, out
    assert "denied exec" not in out, out


@pytest.mark.parametrize("command", [f"{PYTHON} pylink", "bash shlink", "sh shlink",
                                     "perl plink"])
def test_script_through_a_symlink(interpreters_db: Path, run_env: dict[str, str],
                                  command: str) -> None:
    out = _attack(interpreters_db, run_env, command)
    assert MARK not in out, out


@pytest.mark.parametrize("command", [f"{PYTHON} /dev/fd/3 3<evil.data",
                                     "bash /proc/self/fd/3 3<evil.shdata"])
def test_script_through_a_descriptor_path(interpreters_db: Path, run_env: dict[str, str],
                                          command: str) -> None:
    out = _attack(interpreters_db, run_env, command)
    assert MARK not in out, out


def test_module_from_a_zip_on_the_path(interpreters_db: Path, run_env: dict[str, str]) -> None:
    out = _attack(interpreters_db, run_env, f"PYTHONPATH=evil.zip {PYTHON} -m evilmod")
    assert MARK not in out, out


def test_awk_program_file(interpreters_db: Path, run_env: dict[str, str]) -> None:
    out = _attack(interpreters_db, run_env, "awk -f evil.awkdata")
    assert MARK not in out, out


def test_interpreter_outside_the_policy_globs(interpreters_db: Path,
                                              run_env: dict[str, str]) -> None:
    import os
    import sys

    if os.path.realpath(sys.executable).startswith("/usr/bin/"):
        pytest.skip("this Python is the system one (a listed interpreter)")
    (workdir_of(run_env) / "evil.py").write_text(f'print("{MARK}")\n')
    got = run_confined(interpreters_db, f"{sys.executable} evil.py", run_env)
    assert MARK not in got.out, got.out
