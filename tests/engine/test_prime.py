"""`Mirror.prime`: the kernel map filled from the verification cache alone (no stat, no path),
then reconciled by a walk after the attach. Real LMDB databases, a real BPF map in this kernel
(the tracepoint backend's, loaded and never attached), and `trustdb run` itself."""

from __future__ import annotations

import os
import shutil
import subprocess
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.engine import test_run as base
from tests.engine.test_mirror import settle
from trustdb.abi import CInodeKey, Mode
from trustdb.backends.interface import EngineConfig, Scope
from trustdb.backends.tracepoint import TracepointBackend
from trustdb.db import TrustDB
from trustdb.hashing import hash_file
from trustdb.mirror import Mirror, SyncCancelled
from trustdb.model import InodeKey, TrustEntry

pytestmark = [pytest.mark.root, pytest.mark.bpf]


@pytest.fixture
def kernel_map() -> Iterator[TracepointBackend]:
    """A real trusted-inode map: the object loaded in audit mode for a scope no task is in, never
    attached (it decides nothing), detached whatever happens."""
    if os.geteuid() != 0:
        pytest.fail("BPF map tests need root (CI runs as root)")
    backend = TracepointBackend()
    backend.load(EngineConfig(mode=Mode.AUDIT, scope=Scope(cgroup_id=1, cgroup_level=99),
                              max_entries=1 << 14, events_bytes=4096))
    try:
        yield backend
    finally:
        backend.detach()


def _tool(path: Path, tail: bytes) -> Path:
    path.write_bytes(Path("/bin/true").read_bytes() + tail)
    path.chmod(0o755)
    return path


def _trust(db: TrustDB, *paths: Path) -> None:
    entries = []
    for p in paths:
        h = hash_file(str(p))
        entries.append(TrustEntry(str(p), h.digests.blake3, h.digests.size, h.digests.kind))
    db.add_entries("test-prime", "file", entries)


def _key(p: Path) -> InodeKey:
    return InodeKey.from_stat(os.stat(p))


def test_prime_fills_the_kernel_map_from_the_cache_alone(
        tmp_path: Path, kernel_map: TracepointBackend, monkeypatch: pytest.MonkeyPatch) -> None:
    tools = [_tool(tmp_path / f"tool{i}", b"%d" % i) for i in range(5)]
    sink = kernel_map.trusted_inodes
    with TrustDB.open(tmp_path / "db", write=True) as db:
        _trust(db, *tools)
        settle()
        assert Mirror(db, _Counting()).sync().hashed == 5  # the cache is written here

        def no_stat(*a: object, **k: object) -> None:
            raise AssertionError("prime must not stat")

        monkeypatch.setattr(os, "stat", no_stat)
        primed = Mirror(db, sink).prime()
        monkeypatch.undo()
    assert primed == 5
    assert all(_key(t) in sink for t in tools) and len(sink) == 5


def test_prime_leaves_out_revoked_content_and_the_walk_drops_changed_files(
        tmp_path: Path, kernel_map: TracepointBackend) -> None:
    """The same key with other content: a trusted file rewritten in place after it was cached
    gets another ctime, so another key; its old key is primed (dead: no inode has it) and the
    walk removes it. Content no source trusts any more is never primed."""
    keep, revoked, rewritten = (_tool(tmp_path / n, n.encode()) for n in ("k", "r", "w"))
    sink = kernel_map.trusted_inodes
    with TrustDB.open(tmp_path / "db", write=True) as db:
        _trust(db, keep, revoked, rewritten)
        settle()
        Mirror(db, _Counting()).sync()
        db.remove_paths([str(revoked)])
        old = _key(rewritten)
        _tool(rewritten, b"other content, never trusted")
        mirror = Mirror(db, sink)
        mirror.prime()
        assert _key(keep) in sink and _key(revoked) not in sink
        assert old in sink and _key(rewritten) not in sink  # dead key: the inode moved on
        stats = mirror.sync()
        assert _key(keep) in sink and old not in sink and _key(rewritten) not in sink
        assert len(sink) == 1, stats


def test_prime_takes_only_keys_of_the_system_trees_devices(
        tmp_path: Path, kernel_map: TracepointBackend) -> None:
    """The same key with other content, by device: a trusted copy verified on a device of its
    own (here a tmpfs the test mounts; a user's FUSE mount or attached image in the attack) is
    cached under that device's number. Once the device is gone a user can put a filesystem of
    theirs at the reused number, serving other bytes at the cached inode and ctime. The start
    primes only keys of the devices the system trees live on; the walk (which stats what is
    there now) and the first-seen handler (which hashes) cover the rest."""
    from trustdb.session import prime_or_sync
    from trustdb.system_trees import system_devices

    mnt = tmp_path / "media"
    mnt.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=16m", "tdprime", str(mnt)],
                      check=False).returncode:
        pytest.fail("cannot mount a tmpfs (CI runs as root)")
    try:
        on_media = _tool(mnt / "tool", b"media")
        key = _key(on_media)
        assert key.dev not in system_devices()
        with TrustDB.open(tmp_path / "db", write=True) as db:
            _trust(db, on_media)
            settle()
            Mirror(db, _Counting()).sync()  # cached under the tmpfs's device
            assert Mirror(db, _Counting()).prime() == 1  # the cache does hold it
            sink = kernel_map.trusted_inodes
            assert Mirror(db, sink).prime(system_devices()) == 0
            assert key not in sink
            assert prime_or_sync(Mirror(db, sink), db.entry_count()) is False  # walked instead
            assert key in sink  # by the walk, which stat'ed the file that is there now
    finally:
        subprocess.run(["umount", "-l", str(mnt)], check=False)


class _Counting:
    def add(self, keys: object) -> None:
        pass

    def remove(self, keys: object) -> None:
        pass


def test_a_cancelled_walk_stops_and_keeps_only_verified_keys(
        tmp_path: Path, kernel_map: TracepointBackend) -> None:
    tree = tmp_path / "tree"
    tree.mkdir()
    files = []
    for i in range(3000):
        p = tree / f"f{i}"
        p.write_bytes(b"\x7fELF %d" % i)
        p.chmod(0o755)
        files.append(p)
    with TrustDB.open(tmp_path / "db", write=True) as db:
        _trust(db, *files)
        mirror = Mirror(db, kernel_map.trusted_inodes, batch_size=256)
        errors: list[BaseException] = []

        def walk() -> None:
            try:
                mirror.sync()
            except BaseException as e:  # noqa: BLE001 - checked below
                errors.append(e)

        mirror.cancel()  # before it starts: it stops at its first check
        t = threading.Thread(target=walk)
        t.start()
        t.join(timeout=60)
        assert not t.is_alive() and len(errors) == 1 and isinstance(errors[0], SyncCancelled)
        inserted = len(kernel_map.trusted_inodes)
        assert inserted < len(files)
        assert all(k in {_key(f) for f in files} for k in mirror.keys)


def test_a_map_adopted_after_a_restart_loses_the_key_of_a_path_untrusted_meanwhile(
        tmp_path: Path, kernel_map: TracepointBackend) -> None:
    """The service's adopt road: a daemon filled the pinned map and died; `untrust` ran while
    none was up. The new mirror takes the map's keys as they are (no digest, no path known):
    its first refresh must still take the untrusted path's key out (a refresh that replayed
    only the change log would not know which key that path gave, and left it trusted)."""
    kept, dropped = _tool(tmp_path / "kept", b"k"), _tool(tmp_path / "dropped", b"d")
    sink = kernel_map.trusted_inodes
    with TrustDB.open(tmp_path / "db", write=True) as db:
        _trust(db, kept, dropped)
        settle()
        first = Mirror(db, sink)
        first.sync()
        generation = first.generation
        assert generation is not None and _key(dropped) in sink
        db.remove_paths([str(dropped)])
        adopted = Mirror(db, sink)
        pinned = sink.keys()  # as the service's adopt road reads its pin
        assert set(pinned) == {CInodeKey.from_buffer_copy(k).to_key()
                               for k in kernel_map.map("trusted_inodes").keys()}  # noqa: SIM118
        adopted.adopt(generation, pinned)
        stats = adopted.refresh()
        assert stats is not None and stats.removed == 1
        assert _key(dropped) not in sink and _key(kept) in sink and len(sink) == 1
        # Walked now: later untrusts follow the change log, and the adopted keys have digests.
        assert adopted.keys_for(hash_file(str(kept)).digests.blake3) == [_key(kept)]
        db.remove_paths([str(kept)])
        stats = adopted.refresh()
        assert stats is not None and stats.paths == 1 and len(sink) == 0


def test_prime_or_sync_primes_a_covered_database_and_walks_an_uncached_one(
        tmp_path: Path, kernel_map: TracepointBackend) -> None:
    """The start of `run` and of the service: a database whose verification cache covers it is
    primed (the walk is left for after the attach); a first start walks before the attach."""
    from trustdb.session import prime_or_sync

    tools = [_tool(tmp_path / f"tool{i}", b"%d" % i) for i in range(4)]
    sink = kernel_map.trusted_inodes
    with TrustDB.open(tmp_path / "db", write=True) as db:
        _trust(db, *tools)
        settle()
        cold = Mirror(db, sink)
        assert prime_or_sync(cold, db.entry_count()) is False  # nothing cached: walked
        assert cold.hash_count == 4 and cold.generation is not None and len(sink) == 4
        sink.remove(list(cold.keys))
        warm = Mirror(db, sink)
        assert prime_or_sync(warm, db.entry_count()) is True
        assert warm.hash_count == 0 and warm.generation is None and len(sink) == 4
        assert warm.refresh() is not None  # the walk that follows the attach
        assert warm.generation == db.generation and len(sink) == 4


trusted_db = base.trusted_db
run_env = base.run_env


def test_run_on_a_primed_map_denies_content_rewritten_after_it_was_cached(
        tmp_path: Path, run_env: dict[str, str]) -> None:
    """A run whose map is primed from the cache: a trusted tool runs; the same tool rewritten
    in place (same path, same inode, other content) after its verification was cached is
    refused, as is a new file on its reused inode number."""
    db = tmp_path / "db"
    tool = _tool(base.workdir_of(run_env) / "tool", b"trusted tool")
    tools = [shutil.which(t) for t in ("sh", "true", "echo", "rm", "cp")]
    base.trust_files(db, base._closure([t for t in tools if t]) | {str(tool)})
    first = base.run_confined(db, f"{tool}; echo rc=$?", run_env)  # walks, caches
    assert first.out == "rc=0\n", first
    primed = base.run_confined(db, f"{tool}; echo rc=$?", run_env)
    assert primed.out == "rc=0\n", primed
    _tool(tool, b"rewritten, never trusted")
    got = base.run_confined(db, f"{tool}; echo rc=$?", run_env)
    assert got.out in ("rc=126\n", "rc=137\n"), got  # EPERM (first-seen) or SIGKILL (kernel)
    assert "denied exec of" in got.err, got
    tool.unlink()
    _tool(tool, b"a new file, maybe on the same inode number")
    got = base.run_confined(db, f"{tool}; echo rc=$?", run_env)
    assert got.out in ("rc=126\n", "rc=137\n"), got
