"""`installer-begin --pid` (the dnf4 plugin): a window naming one process, whatever it runs
(dnf is a python process), on the host with a real notification group on a tmpfs this test
mounts. What that process closes is trusted `installed-by:dnf` at close and revoked (reported)
when the window ends without a package database vouching for it; what another python process
writes in the same window stays untrusted; a token root does not own opens no window."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.service.test_outputs import _trusted, _watched_tmpfs
from trustdb.service import installer_windows
from trustdb.service.installer_windows import WINDOW_DIR, begin, end, open_windows

WRITER = """
import sys
src, dst = sys.argv[1], sys.argv[2]
sys.stdin.readline()  # wait: the window names this process before it writes
open(dst, "wb").write(open(src, "rb").read() + dst.encode())
"""


def _writer(src: str, dst: Path) -> subprocess.Popen[str]:
    return subprocess.Popen([sys.executable, "-c", WRITER, src, str(dst)],
                            stdin=subprocess.PIPE, text=True)


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root (fanotify, mount, the window dir)")
def test_a_window_naming_a_pid_trusts_that_process_only(tmp_path: Path) -> None:
    elf = os.path.realpath(shutil.which("true") or "/bin/true")
    with _watched_tmpfs(tmp_path, set(), trust_outputs=False) as (trust, mnt, db):
        dnf = _writer(elf, mnt / "by-dnf")
        other = _writer(elf, mnt / "by-other")
        try:
            begin([], pid=dnf.pid)
            trust.sync_windows()
            assert any(w.installer_pid == dnf.pid and w.any_exe for w in open_windows())
            for p in (dnf, other):
                assert p.stdin is not None
                p.stdin.write("go\n")
                p.stdin.flush()
                assert p.wait(30) == 0
            trust.pump()
            found = _trusted(db, mnt / "by-dnf")
            assert found and all("installed-by:dnf" in f for f in found), found
            assert not _trusted(db, mnt / "by-other"), "another process's write was trusted"
        finally:
            end([], pid=dnf.pid)
        trust.sync_windows()
        assert not _trusted(db, mnt / "by-dnf"), "no package database vouched for it"
        assert any("by-dnf" in r for r in trust.reports), trust.reports


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root (chown)")
def test_a_token_root_does_not_own_opens_no_window(tmp_path: Path) -> None:
    installer_windows.make_directory()
    token = WINDOW_DIR / f"test-planted-{os.getpid()}.open"
    token.write_text(f"{os.getpid()} any {installer_windows.start_time(os.getpid())}")
    try:
        os.chown(token, 65534, 65534)
        assert not any(w.token == token.stem for w in open_windows())
        assert not token.exists(), "a planted token is removed"
    finally:
        token.unlink(missing_ok=True)


def test_a_directory_others_can_write_is_not_trusted(tmp_path: Path) -> None:
    d = tmp_path / "installers"
    d.mkdir()
    d.chmod(0o777)
    (d / "x.open").write_text(str(os.getpid()))
    assert not installer_windows.trusted_directory(d)
    assert open_windows(d) == []
