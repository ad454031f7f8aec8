"""The trust database against real LMDB files: semantics, atomicity, writers, growth, disk full."""

from __future__ import annotations

import dataclasses
import os
import signal
import subprocess
import sys
import textwrap
import time
from collections.abc import Iterator
from pathlib import Path

import lmdb
import pytest

from trustdb.db import TrustDB
from trustdb.dbrecords import BusyError, DatabaseError, DiskFullError, SchemaError
from trustdb.dbschema import SCHEMA_VERSION, path_key
from trustdb.hashing import hash_file
from trustdb.model import FileDigests, FileKind, InodeKey, SkippedEntry, TrustEntry


def digest(n: int) -> bytes:
    return n.to_bytes(4, "big") * 8


def entry(path: str, n: int, **kw: object) -> TrustEntry:
    return TrustEntry(path=path, digest=digest(n), size=n, kind=FileKind.ELF, **kw)  # type: ignore[arg-type]


def snapshot(db_path: Path) -> tuple[int, list[tuple[str, str, bytes]], list[tuple[str, int]]]:
    """Everything a user can see: generation, facts, sources."""
    with TrustDB.open(db_path) as db:
        facts = [(r.path, r.label, r.digest) for r in db.iter_paths()]
        return db.generation, facts, [(s.label, s.entries) for s in db.sources()]


def run_py(code: str, **kw: object) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-c", textwrap.dedent(code)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        **kw,  # type: ignore[call-overload]
    )


# --- semantics ---


def test_add_is_idempotent_and_bumps_generation_only_on_change(db_path: Path) -> None:
    with TrustDB.open(db_path, write=True) as db:
        s1 = db.add_entries("manual", "manual", [entry("/a", 1), entry("/b", 2)])
        assert (s1.added, s1.unchanged, s1.generation) == (2, 0, 1)
        s2 = db.add_entries("manual", "manual", [entry("/a", 1)])
        assert (s2.added, s2.unchanged, s2.generation) == (0, 1, 1)
        s3 = db.add_entries("manual", "manual", [entry("/a", 3)])
        assert (s3.added, s3.generation) == (1, 2)
        assert not db.is_trusted(digest(1)), "content nobody names any more is gone"
        assert db.is_trusted(digest(3))
        assert [s.entries for s in db.sources()] == [2]


def test_several_sources_share_content(db_path: Path) -> None:
    with TrustDB.open(db_path, write=True) as db:
        db.replace_source("deb", "deb", [entry("/usr/bin/x", 1, origin="x_1.0")])
        db.add_entries("dir:/build", "dir", [entry("/build/x", 1)])
        assert {r.label for r in db.trusted_by(digest(1))} == {"deb", "dir:/build"}
        db.remove_source("deb")
        assert db.is_trusted(digest(1)), "the build dir still vouches for it"
        assert [r.path for r in db.trusted_by(digest(1))] == ["/build/x"]
        db.remove_paths(["/build"], recursive=True)
        assert not db.is_trusted(digest(1))
        assert db.sources() == [], "an emptied source is dropped"


def test_replace_source_is_exact_and_reports_skips(db_path: Path) -> None:
    with TrustDB.open(db_path, write=True) as db:
        db.replace_source("deb", "deb", [entry("/a", 1), entry("/b", 2)])
        skip = SkippedEntry("/c", "digest mismatch", fatal=True)
        stats = db.replace_source("deb", "deb", [entry("/b", 2), skip, entry("/d", 4)])
        assert (stats.added, stats.removed, stats.unchanged) == (1, 1, 1)
        assert db.last_skipped == [skip]
        assert [r.path for r in db.iter_paths("deb")] == ["/b", "/d"]
        assert not db.is_trusted(digest(1))
        gen = db.generation
        again = db.replace_source("deb", "deb", [entry("/b", 2), entry("/d", 4)])
        assert again.generation == gen == db.generation, "no change, no new generation"


def test_remove_paths_by_source_and_recursive(db_path: Path) -> None:
    with TrustDB.open(db_path, write=True) as db:
        db.add_entries("a", "manual", [entry("/p/x", 1), entry("/p/y/z", 2), entry("/pq", 3)])
        db.add_entries("b", "manual", [entry("/p/x", 1)])
        assert db.remove_paths(["/p/x"], "b").removed == 1
        assert {r.label for r in db.records_for_path("/p/x")} == {"a"}
        assert db.remove_paths(["/p"], recursive=True).removed == 2
        assert [r.path for r in db.iter_paths()] == ["/pq"], "/pq is not below /p"
        assert db.remove_paths(["/nothing"]).removed == 0


def test_iter_paths_sorted_long_and_undecodable_paths(db_path: Path) -> None:
    long_a = "/" + "d" * 300 + "/" + "x" * 250
    long_b = "/" + "d" * 300 + "/" + "y" * 250
    odd = os.fsdecode(b"/bin/caf\xe9")
    with TrustDB.open(db_path, write=True) as db:
        db.add_entries("s", "manual", [entry(long_b, 2), entry(long_a, 1), entry(odd, 3)])
        paths = [r.path for r in db.iter_paths()]
        assert paths == sorted(paths, key=os.fsencode)
        assert set(paths) == {long_a, long_b, odd}
        assert [r.digest for r in db.records_for_path(long_a)] == [digest(1)]
        assert len(path_key(long_a)) < 511
        assert db.remove_paths(["/" + "d" * 300], recursive=True).removed == 2


def test_readonly_open_refuses_writes_and_missing_db(tmp_path: Path, db_path: Path) -> None:
    with pytest.raises(DatabaseError, match="no trust database"):
        TrustDB.open(tmp_path / "nothing")
    TrustDB.open(db_path, write=True).close()
    with TrustDB.open(db_path) as db, pytest.raises(DatabaseError, match="read-only"):
        db.add_entries("s", "manual", [entry("/a", 1)])


def test_schema_too_new_is_refused(db_path: Path) -> None:
    TrustDB.open(db_path, write=True).close()
    env = lmdb.open(str(db_path))
    with env.begin(write=True) as txn:
        txn.put(b"Mschema", (99).to_bytes(4, "big"))
    env.close()
    for write in (False, True):
        with pytest.raises(SchemaError, match="schema 99, newer"):
            TrustDB.open(db_path, write=write)


# --- verification cache ---


def test_digest_cache_roundtrip_merge_and_fresh_ctime(tmp_path: Path, db_path: Path) -> None:
    f = tmp_path / "tool"
    f.write_bytes(b"\x7fELF" + b"x" * 100)
    hashed = hash_file(str(f), want_sha256=True)
    with TrustDB.open(db_path, write=True) as db:
        soon = time.time() + 1.0  # a ctime this close to the hash time (here: ahead of it)
        fresh = InodeKey(hashed.inode.dev, hashed.inode.ino, int(soon), int(soon % 1 * 1e9))
        db.record_verification(fresh, hashed.digests)
        assert db.digest_cache().lookup(fresh, hashed.digests.size) is None, (
            "ctime within FRESH_CTIME_SECONDS of the hash: not cached"
        )
        time.sleep(0.1)
        db.record_verification(hashed.inode, hashed.digests)
        cache = db.digest_cache()
        got = cache.lookup(hashed.inode, hashed.digests.size)
        assert got is not None and got.blake3 == hashed.digests.blake3
        assert got.sha256 == hashed.digests.sha256 and got.kind == FileKind.ELF
        assert cache.lookup(hashed.inode, hashed.digests.size, want_md5=True) is None
        with_md5 = FileDigests(blake3=got.blake3, size=got.size, kind=got.kind, md5=b"m" * 16)
        db.record_verification(hashed.inode, with_md5)
        merged = cache.lookup(hashed.inode, got.size, want_md5=True, want_sha256=True)
        assert merged is not None and merged.md5 == b"m" * 16 and merged.sha256 == got.sha256
        assert cache.lookup(hashed.inode, got.size + 1) is None, "size is part of the key"
        assert db.generation == 0, "cache writes do not bump the generation"
        # another version of the same inode replaces the old record
        newer = InodeKey(hashed.inode.dev, hashed.inode.ino, hashed.inode.ctime_sec - 5, 0)
        db.record_verification(newer, got)
        assert cache.lookup(hashed.inode, got.size) is None
        assert db.status().cached_verifications == 1


def test_trust_entry_inode_is_cached_on_write(tmp_path: Path, db_path: Path) -> None:
    f = tmp_path / "tool"
    f.write_bytes(b"#!/bin/sh\n")
    time.sleep(0.1)
    h = hash_file(str(f))
    e = TrustEntry(str(f), h.digests.blake3, h.digests.size, h.digests.kind, inode=h.inode)
    with TrustDB.open(db_path, write=True) as db:
        db.add_entries("s", "manual", [e])
        got = db.digest_cache().lookup(h.inode, h.digests.size)
        assert got is not None and got.blake3 == h.digests.blake3
        assert db.digest_cache().lookup(h.inode, h.digests.size, want_sha256=True) is None
        # a later import that also computed SHA-256 adds it to the cached verification
        db.replace_source("rpm", "rpm", [dataclasses.replace(e, sha256=b"s" * 32)])
        both = db.digest_cache().lookup(h.inode, h.digests.size, want_sha256=True)
        assert both is not None and both.sha256 == b"s" * 32 and both.blake3 == got.blake3


def test_cache_lookup_inside_own_write_transaction(tmp_path: Path, db_path: Path) -> None:
    """Importers call cache.lookup while replace_source consumes their generator."""
    f = tmp_path / "tool"
    f.write_bytes(b"#!/bin/sh\n")
    time.sleep(0.1)
    h = hash_file(str(f))
    with TrustDB.open(db_path, write=True) as db:
        db.record_verification(h.inode, h.digests)
        cache = db.digest_cache()

        def collect() -> Iterator[TrustEntry]:
            got = cache.lookup(h.inode, h.digests.size)
            assert got is not None
            yield TrustEntry(str(f), got.blake3, got.size, got.kind)

        assert db.replace_source("s", "manual", collect()).added == 1


# --- transactions, writers, growth ---


def test_map_grows_and_whole_transaction_is_retried(db_path: Path) -> None:
    with TrustDB.open(db_path, write=True, map_size=256 << 10) as db:
        before = db.status().map_size
        n = 20_000
        stats = db.add_entries("big", "manual", (entry(f"/f/{i:06d}", i + 1) for i in range(n)))
        assert stats.added == n
        assert db.status().map_size > before
        assert db.status().entries == n and db.status().contents == n


WRITER = """
import sys, time
from pathlib import Path
from trustdb.db import TrustDB
from trustdb.model import TrustEntry, FileKind
def gen():
    for i in range(50_000):
        if i == 20_000:
            print("MID", flush=True)
            time.sleep(60)
        yield TrustEntry(f"/new/{i:06d}", i.to_bytes(32, "big"), 1, FileKind.ELF)
with TrustDB.open(Path(sys.argv[1]), write=True) as db:
    db.add_entries("new", "manual", gen())
"""


def start_writer(db_path: Path) -> subprocess.Popen[str]:
    p = subprocess.Popen(
        [sys.executable, "-c", WRITER, str(db_path)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    assert p.stdout is not None
    line = p.stdout.readline()
    assert line.strip() == "MID", p.stderr.read() if p.stderr else line
    return p


def test_kill_9_mid_transaction_leaves_db_as_before(db_path: Path) -> None:
    with TrustDB.open(db_path, write=True) as db:
        db.add_entries("old", "manual", [entry(f"/old/{i}", i + 1) for i in range(100)])
    before = snapshot(db_path)
    writer = start_writer(db_path)  # 20,000 entries written inside an open transaction
    writer.send_signal(signal.SIGKILL)
    writer.wait()
    assert snapshot(db_path) == before
    with TrustDB.open(db_path, write=True) as db:  # the dead writer's locks are released
        assert db.add_entries("after", "manual", [entry("/x", 7)]).generation == before[0] + 1


def test_second_writer_fails_fast_and_readers_do_not_block(db_path: Path) -> None:
    TrustDB.open(db_path, write=True).close()
    writer = start_writer(db_path)
    try:
        start = time.monotonic()
        with TrustDB.open(db_path, write=True) as db:
            with pytest.raises(BusyError, match=rf"another writer holds .*pid {writer.pid}"):
                db.add_entries("second", "manual", [entry("/y", 1)])
            db.record_verification(InodeKey(1, 2, 3, 4), FileDigests(digest(1), 1, FileKind.ELF))
        with TrustDB.open(db_path) as reader:
            assert reader.generation == 0 and list(reader.iter_paths()) == []
        assert time.monotonic() - start < 5
    finally:
        writer.kill()
        writer.wait()


@pytest.mark.parametrize("write", [False, True])
def test_adopts_map_grown_by_another_process(db_path: Path, write: bool) -> None:
    TrustDB.open(db_path, write=True, map_size=256 << 10).close()
    with TrustDB.open(db_path, write=write, map_size=256 << 10) as reader:
        assert reader.generation == 0
        grow = run_py(
            f"""
            from pathlib import Path
            from trustdb.db import TrustDB
            from trustdb.model import TrustEntry, FileKind
            with TrustDB.open(Path({str(db_path)!r}), write=True, map_size=256 << 10) as db:
                db.add_entries("g", "manual", (TrustEntry(f"/g/{{i}}", i.to_bytes(32, "big"),
                               1, FileKind.ELF) for i in range(20_000)))
            """
        )
        assert grow.wait() == 0, grow.stderr.read() if grow.stderr else ""
        if write:  # e.g. the daemon's mirror, open while `trustdb trust` grew the map
            assert reader.add_entries("w", "manual", [entry("/w", 5)]).generation == 2
        assert reader.generation == 1 + write
        assert reader.status().entries == 20_000 + write


@pytest.mark.root
def test_disk_full_aborts_and_leaves_db_intact(small_disk: Path) -> None:
    db_path = small_disk / "db"
    with TrustDB.open(db_path, write=True) as db:
        db.add_entries("s", "manual", [entry(f"/a/{i}", i + 1) for i in range(100)])
    before = snapshot(db_path)
    more = (entry(f"/b/{i:06d}", i + 1000) for i in range(60_000))
    with TrustDB.open(db_path, write=True) as db, pytest.raises(DiskFullError, match="full"):
        db.add_entries("s", "manual", more)
    assert snapshot(db_path) == before


def test_schema_1_database_is_read_and_stamped_2_by_its_first_write(db_path: Path) -> None:
    with TrustDB.open(db_path, write=True) as db:
        db.add_entries("m", "manual", [entry("/bin/a", 1)])
    with lmdb.open(str(db_path), subdir=True) as env, env.begin(write=True) as txn:
        txn.put(b"Mschema", (1).to_bytes(4, "big"))  # what a version-1 trustdb wrote
    with TrustDB.open(db_path, write=True) as db:
        assert db.status().schema == 1 and db.is_trusted(digest(1))
        db.add_entries("m", "manual", [entry("/bin/b", 2)])
        assert db.status().schema == SCHEMA_VERSION == 2


def test_change_log_lists_what_each_commit_changed(db_path: Path) -> None:
    with TrustDB.open(db_path, write=True) as db:
        db.add_entries("m", "manual", [entry("/bin/a", 1), entry("/bin/b", 2)])
        start = db.generation
        db.add_entries("m", "manual", [entry("/bin/c", 3)])
        db.remove_paths(["/bin/a"])
        db.record_verification(InodeKey(1, 2, 3, 4), FileDigests(digest(9), 9, FileKind.ELF))
        with db.snapshot() as snap:
            changes = snap.changes_since(start)
            assert changes is not None and changes.generation == start + 2
            assert changes.paths == {"/bin/a", "/bin/c"}
            assert (changes.added, changes.removed) == ({digest(3)}, {digest(1)})
            assert snap.changes_since(start + 2) is not None  # nothing since: empty set
            assert snap.changes_since(start + 2).paths == frozenset()  # type: ignore[union-attr]
            assert snap.recorded("/bin/b") == (digest(2),) and snap.recorded("/bin/a") == ()


def test_change_log_keeps_a_bounded_window(db_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("trustdb.dbwrite.CHANGE_LOG_KEEP", 2)
    with TrustDB.open(db_path, write=True) as db:
        for i in range(5):
            db.add_entries("m", "manual", [entry(f"/bin/x{i}", i + 1)])
        with db.snapshot() as snap:
            assert snap.changes_since(snap.generation - 2) is not None
            assert snap.changes_since(snap.generation - 3) is None  # pruned: a full re-mirror
