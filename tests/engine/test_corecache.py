"""Remembered CO-RE targets (trustdb.corecache): a scoped load made the slow way leaves a file
that makes the next load relocate exactly the same instructions; a file it cannot trust is
never used; a tree, even with /run writable, can neither see nor plant one.

The engine loads here are scoped to a cgroup no task is in, and never attached.
"""

from __future__ import annotations

import os
import shutil
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.engine import test_run as base
from tests.engine.test_run import run_confined
from trustdb import corecache
from trustdb.abi import Mode
from trustdb.backends import bpfobject
from trustdb.backends.interface import EngineConfig, Scope
from trustdb.backends.tracepoint import TracepointBackend
from trustdb.confine.mounts import MountPlan
from trustdb.libbpf import BpfObject

pytestmark = [pytest.mark.root, pytest.mark.bpf]

run_env = base.run_env
trusted_db = base.trusted_db

NOWHERE = EngineConfig(mode=Mode.AUDIT, scope=Scope(cgroup_id=1, cgroup_level=99),
                       events_bytes=4096, max_entries=64)
"""A scope no task is in (as the probe's): nothing loaded here can judge anything."""


@pytest.fixture
def state_dir(monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    """A root-only state directory (under /run: a tmp_path lies below the sticky /tmp)."""
    where = Path(f"/run/trustdb-test-{uuid.uuid4().hex[:12]}")
    where.mkdir(mode=0o755)
    monkeypatch.setattr(corecache, "STATE_DIR", where)
    monkeypatch.setattr(corecache, "PENDING", corecache.Pending())
    try:
        yield where
    finally:
        shutil.rmtree(where, ignore_errors=True)


@pytest.fixture
def seen_core_btf(monkeypatch: pytest.MonkeyPatch) -> list[str | None]:
    """The `core_btf` of every object the backends open."""
    seen: list[str | None] = []

    class Spy(BpfObject):
        def __init__(self, path: str | os.PathLike[str], *, core_btf: str | None = None) -> None:
            seen.append(core_btf)
            super().__init__(path, core_btf=core_btf)

    monkeypatch.setattr(bpfobject, "BpfObject", Spy)
    return seen


def _load_programs() -> dict[str, bytes]:
    backend = TracepointBackend()
    backend.load(NOWHERE)
    try:
        return backend._obj.relocated_programs()  # type: ignore[union-attr]
    finally:
        backend.detach()


def _remembered(state: Path) -> list[Path]:
    return sorted((state / corecache.CORE_DIR_NAME).glob("*.btf"))


def test_the_next_load_relocates_the_same_against_the_remembered_file(
        state_dir: Path, seen_core_btf: list[str | None]) -> None:
    slow = _load_programs()
    assert seen_core_btf == [None] and len(corecache.PENDING.loads) == 1
    corecache.write_pending()
    assert len(_remembered(state_dir)) == 1, "bpftool (packaging/apt-packages.txt) missing?"
    fast = _load_programs()
    assert seen_core_btf[1] is not None and seen_core_btf[1].startswith("/proc/self/fd/")
    assert fast == slow
    assert not corecache.PENDING.loads, "a load against the file is not noted again"


def test_a_garbled_file_is_removed_and_the_load_goes_the_slow_way(
        state_dir: Path, seen_core_btf: list[str | None]) -> None:
    key = corecache.current_key(TracepointBackend().object_path)
    assert key is not None
    (state_dir / corecache.CORE_DIR_NAME).mkdir(mode=0o755)
    planted = state_dir / corecache.CORE_DIR_NAME / key
    planted.write_bytes(b"\x9f\xeb\x01\x00" + os.urandom(200))
    programs = _load_programs()
    assert seen_core_btf[0] is not None and seen_core_btf[-1] is None
    assert not planted.exists()
    assert programs  # loaded, the slow way


def test_a_file_others_may_write_is_never_used(state_dir: Path,
                                               seen_core_btf: list[str | None]) -> None:
    _load_programs()
    corecache.write_pending()
    (state_dir / corecache.CORE_DIR_NAME).chmod(0o777)
    _load_programs()
    assert seen_core_btf == [None, None]


def test_the_system_wide_service_never_uses_one(state_dir: Path,
                                                seen_core_btf: list[str | None]) -> None:
    _load_programs()
    corecache.write_pending()
    backend = TracepointBackend()
    obj = backend._open(EngineConfig(mode=Mode.AUDIT, scope=Scope()), 64)
    obj.close()
    assert seen_core_btf == [None, None]


def test_every_run_covers_the_state_directory_even_under_a_grant() -> None:
    plan = MountPlan.for_run(Path("/var/lib/trustdb"), keep=(str(corecache.STATE_DIR), "/run"))
    state = os.path.realpath(corecache.STATE_DIR)
    assert state in plan.hidden and state not in plan.keep and "/run" in plan.keep


def test_a_tree_with_run_writable_cannot_plant_a_core_file(
        trusted_db: Path, run_env: dict[str, str], state_dir: Path) -> None:
    """The attack: a confined root given /run read-write writes a BTF file where the next
    run would look for one (the key is no secret: boot id, kernel, object digest)."""
    key = corecache.current_key(TracepointBackend().object_path)
    target = state_dir / corecache.CORE_DIR_NAME / str(key)
    target.parent.mkdir(mode=0o755)  # as a first run leaves it: the write alone would do
    env = dict(run_env, TRUSTDB_RUN_DIR=str(state_dir))
    script = (f"echo planted > {target} && echo written; "
              f"echo x > {state_dir}/x && echo written; "
              f"for f in {state_dir}/* {state_dir}/.*; do echo \"$f\"; done")
    got = run_confined(trusted_db, script, env, "--allow-write", "/run")
    assert got.code == 0, (got.out, got.err)
    assert "written" not in got.out, got.out  # covered: an empty read-only mount
    assert f"{state_dir}/{corecache.CORE_DIR_NAME}" not in got.out, got.out
    assert not (state_dir / "x").exists()
    # What is there now is the supervisor's own, written after the tree was gone.
    assert not target.exists() or target.read_bytes()[:2] == b"\x9f\xeb"  # BTF magic
