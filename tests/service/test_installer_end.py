"""`trustdb service installer-end --rpm` with another rpm database than the root's own (rpm's or
dnf's `--dbpath`, Debian's ~/.rpmdb): the real rpm installs a real rpmbuild package with
`--dbpath` into a directory of this test, and the import of that database becomes a source of
its own (`rpm:/#DBPATH`) beside the root's `rpm:/`, which keeps what it vouched for."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from trustdb.db import TrustDB
from trustdb.hashing import hash_file
from trustdb.walk import scan

pytestmark = pytest.mark.skipif(
    os.geteuid() != 0 or not shutil.which("rpm") or not shutil.which("rpmbuild")
    or not shutil.which("cc"), reason="needs root (installer-end), rpm, rpmbuild and cc")

TD = [sys.executable, "-c", "from trustdb.cli import main; main()"]


def _digest(path: str) -> bytes:
    return hash_file(path).digests.blake3


def test_installer_end_with_another_rpmdb_keeps_the_roots_source(tmp_path: Path) -> None:
    from tests.vm.test_service_vm import build_test_rpm

    inst = tmp_path / "inst"
    pkg = build_test_rpm(tmp_path, "tdend", "installer-end", str(inst))
    dbpath = tmp_path / "rpmdb"
    subprocess.run(["rpm", "-i", "--nodeps", "--dbpath", str(dbpath), str(pkg)], check=True,
                   capture_output=True)
    db_dir = tmp_path / "db"
    root_file = shutil.which("rpm") or "/usr/bin/rpm"
    with TrustDB.open(db_dir, write=True) as db:
        db.add_entries("rpm:/", "rpm", scan([root_file]))  # what `trustdb import rpm` recorded
    r = subprocess.run([*TD, "service", "installer-end", "--rpm", "--rpm-dbpath", str(dbpath),
                        "--db", str(db_dir)], capture_output=True, text=True, check=False)
    assert r.returncode == 0, r.stderr
    with TrustDB.open(db_dir) as db:
        labels = {s.label for s in db.sources()}
        assert {"rpm:/", f"rpm:/#{dbpath}"} <= labels, labels
        assert db.is_trusted(_digest(root_file)), "the root's rpm source was replaced"
        assert db.is_trusted(_digest(str(inst / "tdrpm")))


def test_the_roots_own_dbpath_is_the_roots_source() -> None:
    from trustdb_importers.rpm import RpmDbImporter

    for same in ("/var/lib/rpm", "/usr/lib/sysimage/rpm/", "var/lib/rpm"):
        assert RpmDbImporter(dbpath=same).source().label == "rpm:/"
    assert RpmDbImporter(dbpath="/root/.rpmdb").source().label == "rpm:/#/root/.rpmdb"
