"""Shared fixtures. Tiers are pytest markers (see pyproject.toml): root, bpf, vm, slow.

A test that needs root or BPF fails loudly when the machine cannot do what it checks; it may
skip only where the capability is truly absent, and says so in its reason.
"""

from __future__ import annotations

import os
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.packaging_build import deb_tree, packages  # noqa: F401  session fixtures

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture
def db_path(tmp_path: Path) -> Path:
    """A fresh, empty trust database directory for one test."""
    p = tmp_path / "db"
    p.mkdir()
    return p


@pytest.fixture
def as_root() -> None:
    """For tests that need root: CI and every session run as root, so this fails, not skips."""
    if os.geteuid() != 0:
        pytest.fail("this test needs root (CI runs as root)")


@pytest.fixture
def cli_env(db_path: Path) -> Iterator[dict[str, str]]:
    """Environment for running the real `trustdb` command against the test database."""
    env = dict(os.environ, TRUSTDB_DB=str(db_path))
    yield env


@pytest.fixture
def small_disk(tmp_path: Path, as_root: None) -> Iterator[Path]:
    """A 1 MiB tmpfs (a disk that fills up), unmounted after the test however it ends."""
    mnt = tmp_path / "small-disk"
    mnt.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(mnt)], check=True)
    try:
        yield mnt
    finally:
        subprocess.run(["umount", str(mnt)], check=True)
