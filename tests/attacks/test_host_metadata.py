"""Changes to the metadata of host files from inside the tree, tracepoint backend (Landlock ABI 7).

Landlock makes the system trees read-only for *content* (no write open, no truncate, no new or
removed entries), but it has no access right for chmod, chown, utime or setxattr, and the
system trees are not read-only mounts while Landlock is in force (the mount namespace shares
the host's root mount read-write). So the confined root can set the setuid bit or a file
capability (security.capability) on a host binary that every host user runs later, and it can
move the ctime of any host file (each trusted key of that inode goes stale).

The probe changes nothing but ctime: chmod to the mode the file already has, utime to the
times it already has. Success means the tree could do the harmful version.
"""

from __future__ import annotations

import glob
import sys
from pathlib import Path

import pytest

from tests.attacks.conftest import inline_code
from tests.engine.test_run import run_confined, workdir_of

pytestmark = [pytest.mark.root, pytest.mark.bpf]

PROBE = '''
import os, sys
path = sys.argv[1]
st = os.stat(path)
done = []
for name, change in (("chmod", lambda: os.chmod(path, st.st_mode & 0o7777)),
                     ("utime", lambda: os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns)))):
    try:
        change()
        done.append(name)
    except OSError as e:
        print(name, "refused", e.errno)
print("CHANGED", " ".join(done) if done else "nothing")
'''


def _host_file() -> str:
    found = sorted(glob.glob("/usr/share/doc/*/copyright"))
    if not found:
        pytest.fail("no /usr/share/doc/*/copyright on this machine (Debian has many)")
    return found[0]


def test_metadata_of_a_system_file(interpreters_db: Path, run_env: dict[str, str]) -> None:
    (workdir_of(run_env) / "probe.txt").write_text(PROBE)
    got = run_confined(interpreters_db, f"{sys.executable} {inline_code('probe.txt')} {_host_file()}", run_env)
    assert "CHANGED" in got.out, (got.out, got.err)
    assert "CHANGED nothing" in got.out, got.out
