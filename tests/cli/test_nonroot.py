"""Queries by a real unprivileged user (uid 65534 through setpriv, no groups) on a database
root wrote: check, list, sources, status and log read it without the LMDB lock file; what the
user may not read is one line and exit 5. Runs the packaged trustdb (the .deb's files) with
Debian's /usr/bin/python3, which every user can execute."""

from __future__ import annotations

import json
import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.packaging_build import launch, shared_dir

NOBODY = "65534"


@pytest.fixture
def world_readable_db(deb_tree: Path) -> Iterator[Path]:
    """A database root made (mode 0755 directory, 0644 files: lock.mdb not writable by others)."""
    where = shared_dir()
    db = where / "db"
    try:
        assert launch(deb_tree, "--db", str(db), "trust", "/bin/true").returncode == 0
        for f in db.iterdir():
            f.chmod(0o644)
        db.chmod(0o755)
        yield db
    finally:
        shutil.rmtree(where, ignore_errors=True)


@pytest.mark.root
@pytest.mark.slow
def test_unprivileged_reads(deb_tree: Path, world_readable_db: Path, as_root: None) -> None:
    db = str(world_readable_db)
    check = launch(deb_tree, "--db", db, "check", "/bin/true", user=NOBODY)
    assert check.returncode == 0, check.stderr
    assert "trusted by manual" in check.stdout
    listed = json.loads(launch(deb_tree, "--db", db, "--json", "list", user=NOBODY).stdout)
    assert [r["path"] for r in listed] == [str(Path("/bin/true").resolve())]
    sources = launch(deb_tree, "sources", "--db", db, user=NOBODY)
    assert sources.returncode == 0 and sources.stdout.startswith("manual  manual  1 entries")
    status = launch(deb_tree, "--json", "status", "--db", db, user=NOBODY)
    assert status.returncode == 0, status.stderr
    assert json.loads(status.stdout)["entries"] == 1
    # Reading never wrote: the lock file is still root's and unchanged in mode.
    assert (world_readable_db / "lock.mdb").stat().st_uid == 0


@pytest.mark.root
@pytest.mark.slow
def test_unprivileged_log_and_permission_errors(
    deb_tree: Path, world_readable_db: Path, as_root: None
) -> None:
    log = world_readable_db.parent / "decisions.jsonl"
    log.write_text("")
    log.chmod(0o644)
    shown = launch(deb_tree, "log", "--file", str(log), user=NOBODY)
    assert shown.returncode == 0, shown.stderr
    log.chmod(0o600)
    denied_log = launch(deb_tree, "log", "--file", str(log), user=NOBODY)
    assert denied_log.returncode == 5
    assert denied_log.stderr.count("\n") == 1 and "permission denied" in denied_log.stderr
    world_readable_db.chmod(0o700)
    denied = launch(deb_tree, "--db", str(world_readable_db), "status", user=NOBODY)
    assert denied.returncode == 5, denied.stderr
    assert denied.stderr == f"trustdb: error: cannot read {world_readable_db}: permission denied\n"
    (world_readable_db).chmod(0o755)
    (world_readable_db / "data.mdb").chmod(0o600)
    unreadable = launch(deb_tree, "--db", str(world_readable_db), "check", "/bin/true",
                        user=NOBODY)
    assert unreadable.returncode == 5 and unreadable.stderr.count("\n") == 1
