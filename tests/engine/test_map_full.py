"""The database outgrows a live `run`'s kernel map (sized from the database at its start): a
real trusted-inode map of 32 entries (the tracepoint backend's, loaded and never attached) and
a real LMDB database that grows past it. What fits goes in, the rest stays denied (fail closed),
and the refresh still applies its removals: an untrust is never lost to a full map. Also the
batched read of a map's keys (the service's adopt road)."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.engine.test_mirror import settle
from trustdb.abi import CInodeKey, Mode
from trustdb.backends.interface import EngineConfig, MapFullError, Scope
from trustdb.backends.tracepoint import TracepointBackend
from trustdb.db import TrustDB
from trustdb.hashing import hash_file
from trustdb.mirror import Mirror
from trustdb.model import InodeKey, TrustEntry

pytestmark = [pytest.mark.root, pytest.mark.bpf]

MAP_ENTRIES = 32


@pytest.fixture
def small_map() -> Iterator[TracepointBackend]:
    if os.geteuid() != 0:
        pytest.fail("BPF map tests need root (CI runs as root)")
    backend = TracepointBackend()
    backend.load(EngineConfig(mode=Mode.AUDIT, scope=Scope(cgroup_id=1, cgroup_level=99),
                              max_entries=MAP_ENTRIES, events_bytes=4096))
    try:
        yield backend
    finally:
        backend.detach()


def _files(d: Path, n: int, tag: str) -> list[Path]:
    d.mkdir()
    out = []
    for i in range(n):
        p = d / f"f{i}"
        p.write_bytes(b"\x7fELF %s %d" % (tag.encode(), i))
        p.chmod(0o755)
        out.append(p)
    return out


def _trust(db: TrustDB, label: str, files: list[Path]) -> None:
    entries = []
    for p in files:
        h = hash_file(str(p))
        entries.append(TrustEntry(str(p), h.digests.blake3, h.digests.size, h.digests.kind))
    db.add_entries(label, "dir", entries)


def _key(p: Path) -> InodeKey:
    return InodeKey.from_stat(os.stat(p))


def _in_map(backend: TracepointBackend) -> set[InodeKey]:
    return {CInodeKey.from_buffer_copy(k).to_key() for k in backend.map("trusted_inodes").keys()}  # noqa: SIM118


def test_the_sink_says_how_many_keys_of_a_batch_went_in(
        tmp_path: Path, small_map: TracepointBackend) -> None:
    keys = [InodeKey(1, i, 1, 0) for i in range(MAP_ENTRIES + 8)]
    with pytest.raises(MapFullError) as e:
        small_map.trusted_inodes.add(keys)
    assert e.value.inserted == len(_in_map(small_map))
    assert MAP_ENTRIES - 2 <= e.value.inserted <= MAP_ENTRIES  # per-CPU free lists may hold some


def test_a_database_grown_past_the_map_fills_it_and_still_applies_an_untrust(
        tmp_path: Path, small_map: TracepointBackend) -> None:
    first = _files(tmp_path / "first", 8, "a")
    with TrustDB.open(tmp_path / "db", write=True) as db:
        _trust(db, "first", first)
        settle()
        mirror = Mirror(db, small_map.trusted_inodes)
        mirror.sync()
        assert mirror.overflow == 0 and _in_map(small_map) == {_key(p) for p in first}
        more = _files(tmp_path / "more", 3 * MAP_ENTRIES, "b")
        _trust(db, "more", more)
        db.remove_paths([str(first[0])])  # an untrust in the same change as the overflow
        settle()
        stats = mirror.refresh()
        assert stats is not None
        assert mirror.overflow > 0
        in_map = _in_map(small_map)
        assert _key(first[0]) not in in_map, "an untrust was lost to the full map"
        assert in_map == set(mirror.keys)  # the mirror knows every key it put in
        assert in_map <= {_key(p) for p in first[1:] + more}
        # Room again (the source removed): the next full sync fills what was left out.
        db.remove_source("more")
        assert mirror.sync().removed > 0
        assert _in_map(small_map) == {_key(p) for p in first[1:]}


def test_a_pinned_map_is_read_back_in_batches_whole(tmp_path: Path) -> None:
    """The adopt road reads the pinned map's keys 8192 per bpf() call: every key comes back once,
    across several batches and hash buckets, from an empty map too."""
    backend = TracepointBackend()
    backend.load(EngineConfig(mode=Mode.AUDIT, scope=Scope(cgroup_id=1, cgroup_level=99),
                              max_entries=1 << 15, events_bytes=4096))
    try:
        m = backend.map("trusted_inodes")
        assert m.keys_batched() == []
        keys = [InodeKey(7, i, i // 3, i % 1000) for i in range(20000)]
        for start in range(0, len(keys), 4096):
            backend.trusted_inodes.add(keys[start : start + 4096])
        back = m.keys_batched(chunk=1024)
        assert len(back) == len(keys)
        assert {CInodeKey.from_buffer_copy(k).to_key() for k in back} == set(keys)
        assert sorted(backend.trusted_inodes.keys()) == sorted(keys)  # the sink's decoding
    finally:
        backend.detach()
