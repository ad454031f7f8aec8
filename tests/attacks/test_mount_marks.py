"""Scripts on mounts the first-seen handler once left unmarked (issue 10, section 3), tracepoint
backend, inside a real `trustdb run`, on mounts this test makes inside its workdir:
- noexec stops exec and executable mappings, not `python3 /dev/shm/evil` (the interpreter only
  reads the file): the tree's noexec mounts get open events while interpreters are judged;
- a mount point with a non-ASCII name (mountinfo's octal escapes decoded as bytes).
"""

from __future__ import annotations

import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.attacks.conftest import inline_code
from tests.engine.test_run import run_confined, workdir_of

pytestmark = [pytest.mark.root, pytest.mark.bpf]

MARK = "UNTRUSTED-SCRIPT-RAN"
PYTHON = "/usr/bin/python3"

FIND_AND_RUN = f'''
import os, subprocess
done = []
for line in open("/proc/self/mountinfo"):
    f = line.split()
    mnt, opts = f[4], f[5].split(",")
    if "noexec" not in opts or "ro" in opts or not os.path.isdir(mnt):
        continue
    path = os.path.join(mnt, "td-evil-noexec")
    try:
        with open(path, "w") as out:
            out.write('print("{MARK}")\\n')
    except OSError:
        continue
    r = subprocess.run(["{PYTHON}", path], capture_output=True, text=True)
    print("tried", mnt, r.stdout.strip(), r.stderr.strip()[-200:])
    done.append(mnt)
    os.unlink(path)
print("mounts tried:", len(done))
'''


@pytest.fixture
def noexec_mount(run_env: dict[str, str]) -> Iterator[Path]:
    """A writable noexec tmpfs inside the workdir (made by this test, gone after it)."""
    where = workdir_of(run_env) / "noexec"
    where.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "noexec,size=1m", "td-noexec", str(where)],
                   check=True)
    try:
        yield where
    finally:
        subprocess.run(["umount", "-l", str(where)], check=False)


def test_script_on_a_noexec_mount(interpreters_db: Path, run_env: dict[str, str],
                                  noexec_mount: Path) -> None:
    (workdir_of(run_env) / "probe.data").write_text(FIND_AND_RUN)
    got = run_confined(interpreters_db, f"{PYTHON} {inline_code('probe.data')}", run_env)
    assert "mounts tried:" in got.out, (got.out, got.err)
    assert "mounts tried: 0" not in got.out, (got.out, got.err)
    assert MARK not in got.out, (got.out, got.err)
    assert "denied script load" in got.out + got.err, (got.out, got.err)


def test_script_on_a_mount_with_a_non_ascii_name(interpreters_db: Path,
                                                 run_env: dict[str, str]) -> None:
    """mountinfo writes a UTF-8 mount point as its bytes (only space, tab, newline and
    backslash are octal escapes): the mount must still be marked."""
    where = workdir_of(run_env) / "Müll dir"
    where.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "td-umlaut", str(where)], check=True)
    try:
        (where / "evil").write_text(f'print("{MARK}")\n')
        got = run_confined(interpreters_db, f"{PYTHON} 'Müll dir/evil'", run_env)
    finally:
        subprocess.run(["umount", "-l", str(where)], check=False)
    assert MARK not in got.out, (got.out, got.err)
    assert "denied script load" in got.err, (got.out, got.err)
    assert "not marked" not in got.err, got.err
