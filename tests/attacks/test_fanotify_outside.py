"""The tree reaching outside its cgroup through fanotify, tracepoint backend.

seccomp leaves fanotify_init(2) and fanotify_mark(2) open and the tree keeps CAP_SYS_ADMIN;
Landlock does not restrict fanotify_mark (a path the tree cannot open can still be marked, as
it can be looked up). A permission mark the tree puts on a directory it cannot see decides
opens made by *every process on the machine*: the tree answers DENY (or, where Landlock refuses
the event's fd, the kernel answers DENY itself; or the tree never answers and they hang). The same mark on a
filesystem, the supervisor's stdlib or the trust database's directory would deny (or, if the
tree stops reading, hang) the whole host. Here it is confined to one test directory, granted
read-only to the tree (as /usr, /etc and trustdb's own install are): a mark needs only a path
the tree can look up.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.engine.test_run import TRUSTDB, workdir_of

pytestmark = [pytest.mark.root, pytest.mark.bpf]

LISTENER = r'''
import ctypes, os, struct, sys, time
libc = ctypes.CDLL(None, use_errno=True)
libc.fanotify_mark.argtypes = [ctypes.c_int, ctypes.c_uint, ctypes.c_uint64, ctypes.c_int,
                               ctypes.c_char_p]
FAN_CLASS_CONTENT, FAN_NONBLOCK, FAN_MARK_ADD = 0x4, 0x2, 0x1
FAN_OPEN_PERM, FAN_EVENT_ON_CHILD = 0x00010000, 0x08000000
fd = libc.fanotify_init(FAN_CLASS_CONTENT | FAN_NONBLOCK, os.O_RDONLY)
if fd < 0 or libc.fanotify_mark(fd, FAN_MARK_ADD, FAN_OPEN_PERM | FAN_EVENT_ON_CHILD, -100,
                                sys.argv[1].encode()) != 0:
    print("fanotify refused", ctypes.get_errno(), flush=True)
    sys.exit(0)
open("marked", "w").close()
deadline = time.monotonic() + float(sys.argv[2])
while time.monotonic() < deadline:
    try:
        data = os.read(fd, 4096)
    except OSError:  # no event, or its fd refused (the kernel then answers DENY itself)
        time.sleep(0.01)
        continue
    off = 0
    while off + 24 <= len(data):
        length, _, _, _, _, efd, _ = struct.unpack_from("<IBBHQii", data, off)
        if efd >= 0:
            os.write(fd, struct.pack("<iI", efd, 0x02))  # FAN_DENY
            os.close(efd)
        off += length
print("listener done", flush=True)
'''


@pytest.fixture
def outside_dir() -> Iterator[Path]:
    top = Path("/run") / f"trustdb-attack-{uuid.uuid4().hex[:8]}"
    (top / "secrets").mkdir(parents=True, mode=0o700)
    (top / "secrets" / "id_rsa").write_text("key\n")
    try:
        yield top / "secrets"
    finally:
        shutil.rmtree(top, ignore_errors=True)


def test_tree_denies_an_open_outside(interpreters_db: Path, run_env: dict[str, str],
                                     outside_dir: Path) -> None:
    workdir = workdir_of(run_env)
    (workdir / "listener.txt").write_text(LISTENER)
    run = subprocess.Popen(
        [*TRUSTDB, "run", "--db", str(interpreters_db), "--allow-read", str(outside_dir), "--",
         sys.executable, "listener.txt",
         str(outside_dir), "20"],
        env=run_env, cwd=workdir, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 60
        while not (workdir / "marked").exists() and run.poll() is None \
                and time.monotonic() < deadline:
            time.sleep(0.1)
        outside = subprocess.run(["cat", str(outside_dir / "id_rsa")], capture_output=True,
                                 text=True, timeout=30, check=False)
    finally:
        out, err = run.communicate(timeout=60)
    assert outside.returncode == 0, f"an open outside the run was denied: {outside.stderr}"
