"""Which verified files the first-seen handler's ignore mark may vouch for (VOUCHED_BIT).

The kernel drops a fanotify ignore mark on FS_MODIFY, but a store through a shared-writable
mapping raises none: a vouched file that a writer in scope can map would run new bytes under
the old mark. These cases use real files, real modes and a real read-only bind mount."""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from trustdb.first_seen_marks import may_vouch

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="needs root (chown, bind mounts)")


def _vouch(path: Path, *, writes_refused: bool) -> bool:
    fd = os.open(path, os.O_RDONLY)
    try:
        return may_vouch(fd, writes_refused=writes_refused)
    finally:
        os.close(fd)


@pytest.fixture
def binary(tmp_path: Path) -> Path:
    b = tmp_path / "tool"
    shutil.copy2("/bin/true", b)
    os.chown(b, 0, 0)
    b.chmod(0o755)
    return b


def test_service_vouches_for_root_owned_files_nobody_else_writes(binary: Path) -> None:
    assert _vouch(binary, writes_refused=False)


def test_service_never_vouches_for_a_users_copy(binary: Path) -> None:
    """The attack: a user copies a trusted binary, runs it (first seen, trusted), then
    rewrites it through MAP_SHARED: no FS_MODIFY, so a vouching mark would let it run."""
    os.chown(binary, 1000, 1000)
    assert not _vouch(binary, writes_refused=False)


@pytest.mark.parametrize("mode", [0o775, 0o757])
def test_service_never_vouches_for_group_or_world_writable_files(binary: Path, mode: int
                                                                 ) -> None:
    binary.chmod(mode)
    assert not _vouch(binary, writes_refused=False)


def test_run_vouches_for_watched_files_whose_write_opens_are_refused(binary: Path) -> None:
    os.chown(binary, 1000, 1000)  # the tree may own it: its write opens are refused anyway
    assert _vouch(binary, writes_refused=True)


def test_run_never_vouches_for_an_unwatched_file_on_a_writable_mount() -> None:
    """A system-tree path on a writable mount (a workdir under /opt, say): its write opens are
    not watched, so nothing would refuse the shared-writable mapping."""
    Path("/opt").mkdir(exist_ok=True)
    with tempfile.NamedTemporaryFile(dir="/opt", prefix="td-vouch-") as f:
        os.fchmod(f.fileno(), 0o755)
        if os.fstatvfs(f.fileno()).f_flag & os.ST_RDONLY:
            pytest.skip("/opt is a read-only mount here")
        assert not may_vouch(f.fileno(), writes_refused=True)


@pytest.fixture
def read_only_view(tmp_path: Path, binary: Path) -> Iterator[Path]:
    view = tmp_path / "ro"
    view.mkdir()
    subprocess.run(["mount", "--bind", str(binary.parent), str(view)], check=True)
    try:
        subprocess.run(["mount", "-o", "remount,bind,ro", str(view)], check=True)
        yield view / binary.name
    finally:
        subprocess.run(["umount", "-l", str(view)], check=False)


def test_a_read_only_mount_of_the_tree_vouches_whoever_owns_the_file(
        binary: Path, read_only_view: Path) -> None:
    """In `run` the read-only mounts are ours: the tree can make no mount."""
    os.chown(binary, 1000, 1000)
    binary.chmod(0o777)
    assert _vouch(read_only_view, writes_refused=True)


def test_the_service_ignores_a_read_only_view_of_a_writable_file(
        binary: Path, read_only_view: Path) -> None:
    """The attack (second review): a user makes a read-only bind view of their own copy of a
    trusted binary (unshare -Urm), execs it through the view, then rewrites it through
    MAP_SHARED on its writable path. A mount flag is the view's, not the file's."""
    os.chown(binary, 1000, 1000)
    assert not _vouch(read_only_view, writes_refused=False)
