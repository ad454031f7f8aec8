"""Native untrusted code through a write to a trusted library that is already mapped executable
(issue 8, route 3, first bullet), tracepoint backend.

Closed for plain open/openat (the first-seen handler refuses write opens of trusted content,
trustdb/write_opens.py, reading the flags from the opener's saved registers), for openat2
(its flags live in memory a second thread could rewrite while the open waits: the run's
seccomp filter answers openat2 ENOSYS), for truncate(2) by path (no open, so no permission
event: seccomp EPERM) and for O_RDONLY | O_TRUNC (no write access is taken before the event:
the flags are checked even when no writer holds the file).

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

from tests.attacks.conftest import inline_code
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
w = subprocess.run([sys.executable, "-c", open(sys.argv[1]).read(), str(addr - base), code.hex()],
    capture_output=True, text=True)
print("writer", w.returncode, w.stdout.strip(), w.stderr.strip()[-200:], flush=True)
print("RESULT", fn(), flush=True)
'''

PLAIN_WRITER = '''
import sys
with open("victimlib.bin", "r+b") as f:
    f.seek(int(sys.argv[1]))
    f.write(bytes.fromhex(sys.argv[2]))
'''

# openat2(O_RDWR) in one thread; once it is blocked in the open (its /proc syscall line shows
# 437), a second thread rewrites open_how.flags to O_RDONLY: the kernel already copied O_RDWR,
# the handler reads O_RDONLY from our memory.
OPENAT2_WRITER = '''
import ctypes, os, sys, threading, time
libc = ctypes.CDLL(None, use_errno=True)
class OpenHow(ctypes.Structure):
    _fields_ = [("flags", ctypes.c_uint64), ("mode", ctypes.c_uint64), ("resolve", ctypes.c_uint64)]
off, code = int(sys.argv[1]), bytes.fromhex(sys.argv[2])
for attempt in range(400):
    how = OpenHow(os.O_RDWR, 0, 0)
    result = {}
    def opener():
        result["tid"] = threading.get_native_id()
        result["fd"] = libc.syscall(437, -100, b"victimlib.bin", ctypes.byref(how),
                                    ctypes.sizeof(how))
    t = threading.Thread(target=opener)
    t.start()
    while "tid" not in result:
        pass
    path = f"/proc/self/task/{result['tid']}/syscall"
    deadline = time.monotonic() + 2
    while time.monotonic() < deadline and "fd" not in result:
        try:
            if open(path).read().startswith("437 "):
                how.flags = os.O_RDONLY
                break
        except OSError:
            pass
    t.join()
    if result["fd"] >= 0:
        os.pwrite(result["fd"], code, off)
        print("won on attempt", attempt)
        break
'''

# truncate(2) is no open (no permission event); the file's content is then empty, untrusted,
# and a write open of untrusted content is not refused, even while another process has the
# file mapped executable: its mapping refaults from the rewritten page cache.
TRUNCATE_WRITER = '''
import os, sys
off, code = int(sys.argv[1]), bytes.fromhex(sys.argv[2])
data = bytearray(open("victimlib.bin", "rb").read())
data[off:off + len(code)] = code
os.truncate("victimlib.bin", 0)
with open("victimlib.bin", "r+b") as f:
    f.write(data)
print("rewritten")
'''

# open(O_RDONLY | O_TRUNC) truncates, but takes write access only after the permission event.
RDONLY_TRUNC_WRITER = '''
import os, sys
off, code = int(sys.argv[1]), bytes.fromhex(sys.argv[2])
data = bytearray(open("victimlib.bin", "rb").read())
data[off:off + len(code)] = code
try:
    os.close(os.open("victimlib.bin", os.O_RDONLY | os.O_TRUNC))
except OSError as e:
    print("refused", e.errno)
    sys.exit(0)
with open("victimlib.bin", "r+b") as f:
    f.write(data)
print("rewritten")
'''


def _attack(db: Path, env: dict[str, str], writer: str) -> str:
    workdir = workdir_of(env)
    shutil.copyfile(_trusted_extension(), workdir / "victimlib.bin")
    (workdir / "victim.txt").write_text(VICTIM)
    (workdir / "writer.txt").write_text(writer)
    got = run_confined(db, f"{sys.executable} {inline_code('victim.txt')} writer.txt", env)
    assert "writer" in got.out, (got.out, got.err)  # the victim ran its library at all
    return got.out


def _trusted_extension() -> Path:
    """An extension module of this Python: trusted by the database (tests/engine/test_run.py
    trusts every shared object of this Python), exporting a function we can call."""
    found = sorted(Path(sysconfig.get_path("platstdlib"), "lib-dynload").glob("_json.*.so"))
    if not found:
        pytest.fail("this Python has no _json extension module")
    return found[0]


def test_plain_write_open_refused(interpreters_db: Path, run_env: dict[str, str]) -> None:
    """Closed: open(2) for writing of the mapped trusted library is refused (EPERM)."""
    out = _attack(interpreters_db, run_env, PLAIN_WRITER)
    assert "RESULT 42" not in out, out


def test_openat2_flags_flipped_while_the_open_waits(interpreters_db: Path,
                                                    run_env: dict[str, str]) -> None:
    """Closed: openat2 gets ENOSYS in the tree, so no open's flags live in memory."""
    out = _attack(interpreters_db, run_env, OPENAT2_WRITER)
    assert "RESULT 42" not in out, out


def test_truncate_then_rewrite(interpreters_db: Path, run_env: dict[str, str]) -> None:
    """Closed: truncate(2) gets EPERM in the tree (ftruncate needs a write fd)."""
    out = _attack(interpreters_db, run_env, TRUNCATE_WRITER)
    assert "RESULT 42" not in out, out


def test_rdonly_otrunc_then_rewrite(interpreters_db: Path, run_env: dict[str, str]) -> None:
    out = _attack(interpreters_db, run_env, RDONLY_TRUNC_WRITER)
    assert "RESULT 42" not in out and "refused 1" in out, out


# Reopening the victim's own mapping for writing through /proc/PID/map_files (the writer is
# the victim's child): an open of the same file, which the write-open check sees.
MAP_FILES_WRITER = '''
import os, sys
off, code = int(sys.argv[1]), bytes.fromhex(sys.argv[2])
maps = f"/proc/{os.getppid()}/maps"
line = next(l for l in open(maps) if l.rstrip().endswith("victimlib.bin"))
rng = line.split()[0]
try:
    fd = os.open(f"/proc/{os.getppid()}/map_files/{rng}", os.O_RDWR)
except OSError as e:
    print("refused", e.errno)
    sys.exit(0)
os.pwrite(fd, code, off)
print("rewritten")
'''


def test_map_files_reopen_refused(interpreters_db: Path, run_env: dict[str, str]) -> None:
    out = _attack(interpreters_db, run_env, MAP_FILES_WRITER)
    assert "RESULT 42" not in out and "refused" in out, out


# The writer is there first: a write fd (or a shared-writable mapping) of the trusted copy held
# from before the library is mapped executable, then the bytes are changed through it
# (pwrite, copy_file_range, fallocate PUNCH_HOLE, a store through the mapping). The mapping of
# a file with writers is refused (the process is killed on tracepoint), so nothing runs.
WRITER_FIRST = '''
import ctypes, mmap, os, sys
how = sys.argv[1]
fd = os.open("victimlib.bin", os.O_RDWR)
shared = mmap.mmap(fd, 0, mmap.MAP_SHARED) if how == "mapping" else None
if how == "mapping":
    os.close(fd)
lib = ctypes.CDLL("./victimlib.bin")
fn = lib.PyInit__json
fn.restype = ctypes.c_long
addr = ctypes.cast(fn, ctypes.c_void_p).value
base = min(int(l.split("-")[0], 16) for l in open("/proc/self/maps")
           if l.rstrip().endswith("victimlib.bin") and int(l.split()[2], 16) == 0)
off, code = addr - base, b"\\x48\\xc7\\xc0\\x2a\\x00\\x00\\x00\\xc3"
if how == "pwrite":
    os.pwrite(fd, code, off)
elif how == "copy_file_range":
    src = os.open("code.bin", os.O_RDONLY)
    os.copy_file_range(src, fd, len(code), 0, off)
elif how == "fallocate":
    libc = ctypes.CDLL(None, use_errno=True)
    libc.fallocate(fd, 3, ctypes.c_long(off & ~4095), ctypes.c_long(4096))  # PUNCH_HOLE|KEEP_SIZE
else:
    shared[off:off + len(code)] = code
print("RESULT", fn(), flush=True)
'''


@pytest.mark.parametrize("how", ["pwrite", "copy_file_range", "fallocate", "mapping"])
def test_writer_held_from_before_the_mapping(interpreters_db: Path, run_env: dict[str, str],
                                             how: str) -> None:
    workdir = workdir_of(run_env)
    shutil.copyfile(_trusted_extension(), workdir / "victimlib.bin")
    (workdir / "code.bin").write_bytes(b"\x48\xc7\xc0\x2a\x00\x00\x00\xc3")
    (workdir / "victim.txt").write_text(WRITER_FIRST)
    got = run_confined(interpreters_db, f"{sys.executable} {inline_code('victim.txt')} {how}; "
                       "echo rc=$?", run_env)
    assert "RESULT" not in got.out and "rc=137" in got.out, (got.out, got.err)
    assert "denied executable mapping of" in got.err, got.err
