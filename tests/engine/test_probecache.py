"""Remembered backend probes (trustdb.probecache): real files under a root-only directory of
/run, real BPF objects loaded in this kernel by `select_loaded`, and the confined tree trying to
plant a refusal."""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path

import pytest

from tests.engine import test_run as base
from trustdb import backends, probecache
from trustdb.abi import Mode
from trustdb.backends.interface import EngineConfig, Scope
from trustdb.backends.lsm import LsmBackend
from trustdb.backends.tracepoint import TracepointBackend

trusted_db = base.trusted_db

pytestmark = [pytest.mark.root]


@pytest.fixture
def root_state(monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    """A state directory only root can write (under /run: root's, 0755), removed afterwards."""
    if os.geteuid() != 0:
        pytest.fail("probe cache tests need root (CI runs as root)")
    where = Path(tempfile.mkdtemp(prefix="trustdb-test-probes-", dir="/run"))
    where.chmod(0o755)
    monkeypatch.setattr(probecache, "STATE_DIR", where)
    try:
        yield where
    finally:
        shutil.rmtree(where, ignore_errors=True)


def _lsm_key() -> probecache.ProbeKey:
    key = probecache.current_key(LsmBackend().object_path)
    assert key is not None, "lsm.bpf.o missing: make bpf"
    return key


def test_remembered_for_this_boot_kernel_and_object_only(root_state: Path) -> None:
    key = _lsm_key()
    probecache.remember("lsm", key, False, "lsm: refused")
    assert probecache.recall("lsm", key) == probecache.RememberedProbe(key, False, "lsm: refused")
    for other in (replace(key, boot_id="another-boot"), replace(key, kernel="6.1.0-99"),
                  replace(key, object_blake3="00" * 32)):
        assert probecache.recall("lsm", other) is None
    assert probecache.recall("tracepoint", key) is None


def test_two_builds_of_an_object_keep_their_own_answers(root_state: Path) -> None:
    """A benchmark alternating two trees (or a checkout beside the package) must not make
    each run probe again because the other build's answer replaced its own."""
    key = _lsm_key()
    other = replace(key, object_blake3="11" * 32)
    probecache.remember("lsm", key, False, "lsm: refused")
    probecache.remember("lsm", other, False, "lsm: refused (other build)")
    assert probecache.recall("lsm", key) == probecache.RememberedProbe(key, False, "lsm: refused")
    assert probecache.recall("lsm", other) is not None


def test_answers_not_only_roots_are_ignored(root_state: Path) -> None:
    key = _lsm_key()
    probecache.remember("lsm", key, False, "lsm: refused")
    path = probecache.answer_path("lsm", key)
    os.chown(path, 65534, 65534)  # written by someone else
    assert probecache.recall("lsm", key) is None
    os.chown(path, 0, 0)
    path.chmod(0o666)  # anyone may rewrite it
    assert probecache.recall("lsm", key) is None
    path.chmod(0o644)
    probecache.probe_dir().chmod(0o775)  # the group may replace it
    assert probecache.recall("lsm", key) is None
    probecache.probe_dir().chmod(0o755)
    assert probecache.recall("lsm", key) is not None
    real = path.with_name("real.json")
    path.rename(real)
    path.symlink_to(real)  # a link to an answer elsewhere
    assert probecache.recall("lsm", key) is None


def test_sticky_tmp_is_never_used(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """/tmp (1777) lets anyone plant a directory of their own: nothing is read or written."""
    monkeypatch.setattr(probecache, "STATE_DIR", tmp_path / "state")
    key = _lsm_key()
    probecache.remember("lsm", key, False, "lsm: refused")
    assert not probecache.answer_path("lsm", key).exists()
    assert probecache.recall("lsm", key) is None


def _scope() -> EngineConfig:
    # Audit mode and a scope no task is in: the objects are loaded, never attached.
    return EngineConfig(mode=Mode.AUDIT, scope=Scope(cgroup_id=1, cgroup_level=99),
                        max_entries=1 << 14)


@pytest.mark.bpf
def test_select_skips_a_remembered_refusal(root_state: Path,
                                           monkeypatch: pytest.MonkeyPatch) -> None:
    probecache.remember("lsm", _lsm_key(), False, "lsm: refused (remembered)")

    def no_probe(self: LsmBackend) -> None:
        raise AssertionError("a remembered refusal must not be probed again")

    monkeypatch.setattr(LsmBackend, "probe", no_probe)
    chosen = backends.select_loaded(None, _scope())
    try:
        assert isinstance(chosen, TracepointBackend)
        assert ("lsm", "lsm: refused (remembered)") in chosen.refused
    finally:
        chosen.detach()


@pytest.mark.bpf
def test_a_planted_ok_costs_only_the_real_load(root_state: Path) -> None:
    """A remembered "ok" is no proof: the backend's own load still decides (this kernel
    refuses BPF LSM at load, so the tracepoint backend is chosen)."""
    if LsmBackend().probe().ok:
        pytest.skip("this kernel runs BPF LSM: the refusal path cannot be shown here")
    probecache.remember("lsm", _lsm_key(), True, "lsm: loaded (planted)")
    chosen = backends.select_loaded(None, _scope())
    try:
        assert isinstance(chosen, TracepointBackend)
        assert [name for name, _ in chosen.refused] == ["lsm"]
    finally:
        chosen.detach()


@pytest.mark.bpf
def test_select_remembers_what_it_probed(root_state: Path) -> None:
    chosen = backends.select_loaded(None, _scope())
    chosen.detach()
    remembered = probecache.recall("lsm", _lsm_key())
    assert remembered is not None
    assert remembered.ok == (chosen.name == "lsm")


@pytest.mark.bpf
def test_the_tree_cannot_plant_a_refusal(trusted_db: Path, tmp_path: Path) -> None:
    """Inside `trustdb run` the tree (root) writes a refusal where the host's runs read it:
    /run is the tree's own tmpfs, so the host's answer is untouched."""
    host = Path("/run/trustdb/probes") / probecache.answer_path("lsm", _lsm_key()).name
    (tmp_path / "log").mkdir()
    env = dict(os.environ, TRUSTDB_LOG=str(tmp_path / "log" / "decisions.jsonl"))
    env.pop("TRUSTDB_RUN_DIR", None)
    planted = '{"key": {}, "ok": false, "reason": "planted"}'
    got = base.run_confined(trusted_db, f"mkdir -p {host.parent}; echo '{planted}' > {host}; echo rc=$?", env)
    assert "rc=" in got.out, got
    # Not compared byte for byte: other runs on this host (another build of the object) may
    # rewrite the file meanwhile. What matters is that the tree's answer is not there.
    after = host.read_bytes() if host.exists() else None
    assert after is None or b"planted" not in after, got
