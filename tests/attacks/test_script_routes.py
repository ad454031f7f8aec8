"""More routes by which an untrusted script reaches a trusted interpreter (issue 10, section 3),
tracepoint backend, each inside a real `trustdb run`: busybox told which applet to be by its
argv[0], an interpreter started through ld.so (/proc/PID/exe is then ld.so), and the script's
name swapped between an untrusted and a trusted file while the interpreter opens it.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from tests.engine.test_run import run_confined, workdir_of

pytestmark = [pytest.mark.root, pytest.mark.bpf]

MARK = "UNTRUSTED-SCRIPT-RAN"
PYTHON = "/usr/bin/python3"
BUSYBOX = "/usr/bin/busybox"
TRUSTED_SCRIPT = "/usr/lib/python3.11/this.py"
"""Trusted content (the stdlib): a copy of it in the workdir is trusted too."""


def _plant(workdir: Path) -> None:
    (workdir / "evil.data").write_text(f'print("{MARK}")\n')
    (workdir / "evil.shdata").write_text(f"echo {MARK}\n")
    (workdir / "evil.awkdata").write_text(f'BEGIN {{ print "{MARK}" }}\n')


@pytest.mark.parametrize("command", [
    f"bash -c 'exec -a sh {BUSYBOX} ./evil.shdata'",
    f"{BUSYBOX} ln -s {BUSYBOX} ./sh && ./sh ./evil.shdata",
    f"{BUSYBOX} ln -s {BUSYBOX} ./ash && ./ash evil.shdata",
    f"bash -c 'exec -a awk {BUSYBOX} -f ./evil.awkdata'",
    f"{BUSYBOX} sh ./evil.shdata",
])
def test_busybox_applet_by_argv0(interpreters_db: Path, run_env: dict[str, str],
                                 command: str) -> None:
    _plant(workdir_of(run_env))
    got = run_confined(interpreters_db, command, run_env)
    assert MARK not in got.out + got.err, (got.out, got.err)
    assert "denied script load" in got.err, got.err


def test_busybox_applets_still_work(interpreters_db: Path, run_env: dict[str, str]) -> None:
    """Control: a trusted busybox applet reading data, and busybox sh running trusted code."""
    (workdir_of(run_env) / "lines.txt").write_text("one\ntwo\n")
    got = run_confined(interpreters_db,
                       f"{BUSYBOX} cat lines.txt && bash -c 'exec -a sh {BUSYBOX} -c \"echo sh-ok\"'",
                       run_env)
    assert "two" in got.out and "sh-ok" in got.out, (got.out, got.err)


def test_interpreter_through_ld_so(interpreters_db: Path, run_env: dict[str, str]) -> None:
    _plant(workdir_of(run_env))
    got = run_confined(interpreters_db,
                       f"/lib64/ld-linux-x86-64.so.2 {PYTHON} ./evil.data; "
                       f"/lib64/ld-linux-x86-64.so.2 --argv0 x {PYTHON} evil.data", run_env)
    assert MARK not in got.out + got.err, (got.out, got.err)
    assert "denied script load" in got.err, got.err


TRIES = 60


def test_script_name_swapped_while_it_is_opened(interpreters_db: Path,
                                                run_env: dict[str, str]) -> None:
    """A sibling swaps `x` (untrusted) and `y` (trusted) with renameat2(RENAME_EXCHANGE) in a
    loop while python3 opens `x`: the file python opened and the file `x` names when the
    handler looks differ about half the time. Each try must either run the trusted file or
    be refused."""
    wd = workdir_of(run_env)
    (wd / "x").write_text(f'print("{MARK}")\n')
    shutil.copyfile(TRUSTED_SCRIPT, wd / "y")
    swap = ("perl -e '($a, $b) = (\"x\", \"y\"); "
            "while (1) { syscall(316, -100, $a, -100, $b, 2) }'")  # renameat2, EXCHANGE
    got = run_confined(interpreters_db,
                       f"{swap} & for i in $({BUSYBOX} seq {TRIES}); do {PYTHON} x; done 2>&1 | "
                       f"{BUSYBOX} sort | {BUSYBOX} uniq -c; kill $!", run_env, timeout=300)
    assert MARK not in got.out, (got.out, got.err[-2000:])
    # Every try ran the trusted file or was refused (while the swap loop runs, both files'
    # ctimes move under the hash, so the trusted one is mostly refused too: fail-closed).
    tries = sum(int(line.split()[0]) for line in got.out.splitlines()
                if "Beautiful is better" in line or "can't open file" in line)
    assert tries >= TRIES, (got.out, got.err[-2000:])
