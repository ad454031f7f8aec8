"""Native untrusted code through a write to a trusted library that is already mapped executable
(issue 8, route 3, first bullet), tracepoint backend.

A trusted library copied into the workdir (a venv's extension module, a vendored .so) is
verified and mapped executable by one confined process. A second confined process then opens
the same file for writing and overwrites one function with `mov rax, 42; ret`. The executable
mapping shares the page cache, so the first process runs the new bytes: the checks ran at mmap
time and nothing re-checks a mapping that exists. The attack succeeds if the call returns 42.
"""

from __future__ import annotations

import shutil
import sys
import sysconfig
from pathlib import Path

import pytest

from tests.engine.test_run import run_confined, workdir_of

pytestmark = [pytest.mark.root, pytest.mark.bpf]

VICTIM = '''
import ctypes, subprocess, sys
lib = ctypes.CDLL("./victimlib.bin")
fn = lib.PyInit__json
fn.restype = ctypes.c_long
addr = ctypes.cast(fn, ctypes.c_void_p).value
base = min(int(l.split("-")[0], 16) for l in open("/proc/self/maps")
           if l.rstrip().endswith("victimlib.bin") and int(l.split()[2], 16) == 0)
code = b"\\x48\\xc7\\xc0\\x2a\\x00\\x00\\x00\\xc3"  # mov rax, 42; ret
w = subprocess.run([sys.executable, "-c",
    "import sys; f=open('victimlib.bin','r+b'); f.seek(int(sys.argv[1])); "
    "f.write(bytes.fromhex(sys.argv[2]))", str(addr - base), code.hex()],
    capture_output=True, text=True)
print("writer", w.returncode, w.stderr.strip()[-200:])
print("RESULT", fn())
'''


def _trusted_extension() -> Path:
    """An extension module of this Python: trusted by the database (tests/engine/test_run.py
    trusts every shared object of this Python), exporting a function we can call."""
    found = sorted(Path(sysconfig.get_path("platstdlib"), "lib-dynload").glob("_json.*.so"))
    if not found:
        pytest.fail("this Python has no _json extension module")
    return found[0]


@pytest.mark.xfail(strict=True, raises=AssertionError, reason=(
    "HOLE: a confined process may open for write a trusted file another confined process has "
    "mapped executable; the mapping runs the new bytes (no write-open denial for files that "
    "are mapped executable or trusted, on the tracepoint backend)"))
def test_overwrite_a_mapped_trusted_library(interpreters_db: Path,
                                            run_env: dict[str, str]) -> None:
    workdir = workdir_of(run_env)
    shutil.copyfile(_trusted_extension(), workdir / "victimlib.bin")
    (workdir / "victim.txt").write_text(VICTIM)
    got = run_confined(interpreters_db, f"{sys.executable} victim.txt", run_env)
    assert "writer" in got.out, (got.out, got.err)  # the victim ran its library at all
    assert "RESULT 42" not in got.out, got.out
