"""The read-only system trees of `trustdb run` (/usr, /etc, ...: where trusted files keep full
ignore marks, so no write open of them is ever asked about): the confined root tries every way
to get a writable view of /usr and write into it. Each call must fail (EPERM from seccomp, or
EROFS), and nothing under /usr may change. Tracepoint backend, this host; inside the run's
own mount namespace and cgroup.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

from tests.engine.test_run import run_confined

pytestmark = [pytest.mark.root, pytest.mark.bpf]

ATTEMPTS = r'''
import ctypes, errno, json, os, struct
libc = ctypes.CDLL(None, use_errno=True)
out = {}
def call(name, *args):
    r = getattr(libc, name)(*args) if isinstance(name, str) else libc.syscall(*name, *args)
    return "ok" if r >= 0 else errno.errorcode.get(ctypes.get_errno(), "?")
MS_REMOUNT, MS_BIND = 32, 4096
out["remount rw"] = call("mount", b"none", b"/usr", None, MS_REMOUNT | MS_BIND, None)
out["remount fs rw"] = call("mount", b"none", b"/usr", None, MS_REMOUNT, None)
attr = struct.pack("=QQQQ", 0, 1, 0, 0)  # attr_set 0, attr_clr MOUNT_ATTR_RDONLY
out["mount_setattr"] = call((442, -100, b"/usr", 0, attr, len(attr)))
out["fspick"] = call((433, -100, b"/usr", 0))
out["open_tree clone"] = call((428, -100, b"/usr", 1))  # OPEN_TREE_CLONE
out["unshare mount ns"] = call("unshare", 0x00020000)
out["clone new ns"] = call((56, 0x00020000 | 17, 0, 0, 0, 0))
try:
    os.open("/usr/trustdb-attack", os.O_WRONLY | os.O_CREAT, 0o644)
    out["create in /usr"] = "ok"
except OSError as e:
    out["create in /usr"] = errno.errorcode[e.errno]
print(json.dumps(out))
'''


def test_no_writable_view_of_the_system_trees(interpreters_db: Path,
                                              run_env: dict[str, str]) -> None:
    script = Path(run_env["TRUSTDB_LOG"]).parents[1] / "attempts.txt"
    script.write_text(ATTEMPTS)
    got = run_confined(interpreters_db, f"{sys.executable} -I -S -c \"$(cat attempts.txt)\"",
                       run_env)
    results = json.loads(got.out.strip().splitlines()[-1])
    assert results.pop("create in /usr") == "EROFS", results
    assert results == dict.fromkeys(results, "EPERM"), results
    assert not Path("/usr/trustdb-attack").exists()
