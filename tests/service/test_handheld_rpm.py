"""rpm run by hand on the host: the daemon's side of its implicit window (trustdb.service.handheld)
with a real notification group on a tmpfs this test mounts (it answers nothing: it can deny
nothing), the real rpm and a real rpmbuild package installed with `--root` into that tmpfs.
What rpm closes is trusted `installed-by:rpm` at close, and stays trusted after rpm exits because
its rpmdb vouches for it; `rpm -q` costs no import; rpm as a user, and rpm started by the daemon
itself, get nothing. Under enforce (the %post running its new binary) in tests/vm/guest_service.py.
"""

from __future__ import annotations

import contextlib
import os
import select
import shutil
import subprocess
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.service.test_outputs import _Engine
from trustdb.db import TrustDB
from trustdb.hashing import hash_file
from trustdb.model import InodeKey
from trustdb.service.handheld import descends_from, rpm_databases, runs_as_root
from trustdb.service.installers import InstallerTrust

pytestmark = pytest.mark.skipif(
    os.geteuid() != 0 or not shutil.which("rpm") or not shutil.which("rpmbuild")
    or not shutil.which("cc"), reason="needs root (fanotify, mount), rpm, rpmbuild and cc")


@pytest.fixture(scope="module")
def package(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from tests.vm.test_service_vm import build_test_rpm

    return build_test_rpm(tmp_path_factory.mktemp("rpm"), "tdhand", "by-hand", "/opt/tdhand")


@pytest.fixture
def rpm_root(tmp_path: Path) -> Iterator[tuple[InstallerTrust, Path, TrustDB]]:
    # Not under tmp_path (pytest's directories are root's alone): rpm as a user must reach it.
    mnt = Path(tempfile.mkdtemp(prefix="td-rpmroot-"))
    mnt.chmod(0o755)
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64m", "tdrpm", str(mnt)],
                      check=False).returncode:
        mnt.rmdir()
        pytest.skip("cannot mount a tmpfs here")
    db = TrustDB.open(tmp_path / "db", write=True)
    rpm_key = InodeKey.from_stat(os.stat(os.path.realpath(shutil.which("rpm") or "rpm")))
    # own_pid=-1: this test starts rpm, and the daemon's own rpm children are never trusted.
    trust = InstallerTrust(filesystems=lambda: [str(mnt)], own_pid=-1)
    try:
        trust.start(_Engine(db, {rpm_key}))  # type: ignore[arg-type]
        yield trust, mnt, db
    finally:
        trust.stop()
        db.close()
        subprocess.run(["umount", "-l", str(mnt)], check=False)
        with contextlib.suppress(OSError):
            mnt.rmdir()


@contextlib.contextmanager
def _daemon_loop(trust: InstallerTrust) -> Iterator[None]:
    """What the daemon's main loop does: pump as soon as the group has events (rpm's exec event
    must be read while rpm still runs: its uid and command line are read from /proc)."""
    stop = threading.Event()

    def loop() -> None:
        poller = select.poll()
        poller.register(trust.filenos()[0], select.POLLIN)
        while not stop.is_set():
            if poller.poll(50):
                trust.pump()

    thread = threading.Thread(target=loop, daemon=True)
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join()
        trust.pump()


def _rpm(mnt: Path, *args: str, user: bool = False) -> subprocess.CompletedProcess[str]:
    prefix = ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups"] if user else []
    return subprocess.run([*prefix, "rpm", "--root", str(mnt), "--dbpath", "/rpmdb", *args],
                          capture_output=True, text=True, check=False)


def _origins(db: TrustDB, path: Path) -> list[str]:
    return [f"{r.label}|{r.origin}" for r in db.trusted_by(hash_file(str(path)).digests.blake3)]


def _rpm_by_hand(trust: InstallerTrust, mnt: Path, package: Path, *,
                 settle: bool = True) -> Path:
    """`settle`: then run the import at rpm's exit to its end, as the main loop's steps do."""
    with _daemon_loop(trust):
        assert _rpm(mnt, "--initdb").returncode == 0
        r = _rpm(mnt, "-i", "--nodeps", "--nopost", str(package))
    assert r.returncode == 0, r.stderr
    if settle:
        trust.settle()
    return mnt / "opt/tdhand/tdrpm"


def test_rpm_by_hand_trusted_at_close_then_verified(
        rpm_root: tuple[InstallerTrust, Path, TrustDB], package: Path) -> None:
    trust, mnt, db = rpm_root
    installed = _rpm_by_hand(trust, mnt, package, settle=False)
    # rpm has exited: the pump read its close-writes and queued the import of its rpmdb, which
    # the main loop runs in steps (its fd stays readable until then): trusted at close meanwhile.
    busy = trust.filenos()[2]
    deadline = time.monotonic() + 30  # the pump may read rpm's last events a beat after it exits
    trust.pump()
    while not _readable(busy) and time.monotonic() < deadline:
        time.sleep(0.01)
        trust.pump()
    assert _readable(busy), "no import pending"
    assert any("@" in f for f in _origins(db, installed)), _origins(db, installed)
    while _readable(busy):
        trust.on_ready(set())
    found = _origins(db, installed)
    assert any(f.startswith("rpm:") for f in found), found
    assert not any("@" in f for f in found), found  # the window's own source is gone
    assert not trust.reports, trust.reports
    assert not list(Path("/run/trustdb/installers").glob("rpm-*.implicit"))


def _readable(fd: int) -> bool:
    return bool(select.select([fd], [], [], 0)[0])


def test_an_rpm_window_left_by_a_killed_daemon_is_dropped(tmp_path: Path) -> None:
    """Its files were trusted at close and nothing will verify them now: fail closed."""
    from trustdb.walk import scan

    db = TrustDB.open(tmp_path / "db", write=True)
    prog = os.path.realpath(shutil.which("rpm") or "/usr/bin/rpm")
    db.add_entries("installer:rpm@4242.77", "installer", scan([prog]))
    trust = InstallerTrust(filesystems=list, own_pid=-1)
    try:
        trust.start(_Engine(db, set()))  # type: ignore[arg-type]
        assert not [s for s in db.sources() if "@" in s.label]
        assert not db.is_trusted(hash_file(prog).digests.blake3)
    finally:
        trust.stop()
        db.close()


def _rpm_with_debians_dbpath(trust: InstallerTrust, mnt: Path, package: Path,
                             home: str) -> None:
    """rpm by hand without --dbpath (Debian's: $HOME/.rpmdb), then its exit's import."""
    with _daemon_loop(trust):
        r = subprocess.run(["rpm", "--root", str(mnt), "-i", "--nodeps", "--nopost",
                            str(package)], env={**os.environ, "HOME": home},
                           capture_output=True, text=True, check=False)
    assert r.returncode == 0, r.stderr
    assert (mnt / home.lstrip("/") / ".rpmdb/rpmdb.sqlite").exists(), "not Debian's rpm?"
    trust.settle()


def test_rpm_by_hand_with_debians_own_dbpath(
        rpm_root: tuple[InstallerTrust, Path, TrustDB], package: Path) -> None:
    """No --dbpath: Debian's rpm keeps its database in $HOME/.rpmdb, and that one is imported."""
    trust, mnt, db = rpm_root
    _rpm_with_debians_dbpath(trust, mnt, package, "/home-td")
    found = _origins(db, mnt / "opt/tdhand/tdrpm")
    assert f"rpm:{mnt}#/home-td/.rpmdb|tdhand-0:1.0-1.x86_64" in found, found
    assert not trust.reports, trust.reports


def test_an_rpmdb_a_user_could_write_vouches_for_nothing(
        rpm_root: tuple[InstallerTrust, Path, TrustDB], package: Path) -> None:
    """A root rpm run with a user's HOME (`sudo -E rpm -i`) keeps Debian's rpmdb under that
    home, which the user could have filled with forged headers: the import at rpm's exit
    refuses it, and what rpm wrote loses its trust (fails without the ownership check)."""
    trust, mnt, db = rpm_root
    home = mnt / "home-user"
    home.mkdir()
    os.chown(home, 65534, 65534)
    _rpm_with_debians_dbpath(trust, mnt, package, "/home-user")
    assert _origins(db, mnt / "opt/tdhand/tdrpm") == []
    assert any("not root's alone" in line for line in trust.reports), trust.reports


def test_rpm_query_costs_no_import(rpm_root: tuple[InstallerTrust, Path, TrustDB],
                                   package: Path) -> None:
    trust, mnt, db = rpm_root
    _rpm_by_hand(trust, mnt, package)
    trust.pump()
    before = [s.label for s in db.sources()]
    generation = db.generation
    with _daemon_loop(trust):
        assert _rpm(mnt, "-qa").returncode == 0
    assert [s.label for s in db.sources()] == before
    assert db.generation == generation, "rpm -q wrote to the database"


def test_rpm_as_a_user_gets_nothing(rpm_root: tuple[InstallerTrust, Path, TrustDB],
                                    package: Path) -> None:
    trust, mnt, db = rpm_root
    os.chmod(mnt, 0o777)
    with _daemon_loop(trust):
        r = _rpm(mnt, "--initdb", user=True)
        assert r.returncode == 0, r.stderr
        readable = Path(shutil.copy(package, mnt / package.name))  # the package too
        r = _rpm(mnt, "-i", "--nodeps", "--nopost", str(readable), user=True)
    installed = mnt / "opt/tdhand/tdrpm"
    assert installed.exists(), r.stderr
    trust.pump()
    assert not _origins(db, installed), "a user's rpm made its file trusted"


def test_the_daemons_own_rpm_gets_nothing(tmp_path: Path, package: Path) -> None:
    """Without own_pid=-1 the test process is the daemon: its rpm child is never a writer."""
    mnt = tmp_path / "root"
    mnt.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "tdrpm2", str(mnt)], check=False).returncode:
        pytest.skip("cannot mount a tmpfs here")
    db = TrustDB.open(tmp_path / "db", write=True)
    rpm_key = InodeKey.from_stat(os.stat(os.path.realpath(shutil.which("rpm") or "rpm")))
    trust = InstallerTrust(filesystems=lambda: [str(mnt)])
    try:
        trust.start(_Engine(db, {rpm_key}))  # type: ignore[arg-type]
        installed = _rpm_by_hand(trust, mnt, package)
        trust.pump()
        assert not _origins(db, installed)
    finally:
        trust.stop()
        db.close()
        subprocess.run(["umount", "-l", str(mnt)], check=False)


def test_command_line_and_process_checks() -> None:
    assert rpm_databases(["rpm", "-i", "--dbpath=/d", "--root", "/r", "x.rpm"]) == ("/r", "/d")
    assert rpm_databases(["rpm", "-Uvh", "x.rpm"]) == ("/", None)
    assert runs_as_root(os.getpid())
    child = subprocess.Popen(["setpriv", "--reuid=65534", "sleep", "5"])
    try:
        import time

        time.sleep(0.3)
        assert not runs_as_root(child.pid)
        assert descends_from(child.pid, os.getpid())
        assert not descends_from(os.getpid(), child.pid)
    finally:
        child.kill()
        child.wait()
