"""The mirror against real files on ext4 (the tmp dir), tmpfs and an overlayfs mount it makes.

The database is parametrized: the real LMDB `TrustDB` and, beside it, `FakeTrustDB` (a dict-backed
stand-in that says so). The kernel map is `ListSink`, a fake KeySink that records every batch;
the BPF tests fill the real map through the same interface.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from tests.engine.conftest import Confined, closure
from trustdb.abi import Hook, Mode, Verdict
from trustdb.db import TrustDB
from trustdb.dbrecords import PathRecord
from trustdb.events import REASON_UNTRUSTED_EXEC, Decision, EventReader, EventSink
from trustdb.hashing import FRESH_CTIME_SECONDS, hash_file
from trustdb.mirror import (
    OVERLAYFS_SUPER_MAGIC,
    REASON_NOT_REGULAR,
    REASON_OVERLAY_UNRESOLVED,
    REASON_UNTRUSTED,
    REASON_VANISHED,
    Mirror,
    OverlayMount,
    coarse_now_ns,
    ctime_settled_at,
    fs_magic,
    kernel_has_multigrain,
    overlay_mounts,
)
from trustdb.model import FileDigests, FileKind, InodeKey, TrustEntry


@dataclass
class ListSink:
    """Fake KeySink: a set plus the list of every batch it was given."""

    present: set[InodeKey] = field(default_factory=set)
    add_batches: list[list[InodeKey]] = field(default_factory=list)
    remove_batches: list[list[InodeKey]] = field(default_factory=list)

    def add(self, keys: Sequence[InodeKey]) -> None:
        self.add_batches.append(list(keys))
        self.present.update(keys)

    def remove(self, keys: Sequence[InodeKey]) -> None:
        self.remove_batches.append(list(keys))
        self.present.difference_update(keys)


class _FakeCache:
    def __init__(self, store: dict[tuple[InodeKey, int], FileDigests]) -> None:
        self._store = store

    def lookup(
        self, key: InodeKey, size: int, *, want_sha256: bool = False, want_md5: bool = False
    ) -> FileDigests | None:
        return self._store.get((key, size))


class FakeTrustDB:
    """Fake of trustdb.db.TrustDB: just the calls the mirror makes, in dicts."""

    def __init__(self) -> None:
        self.records: dict[str, bytes] = {}
        self.verifications: dict[tuple[InodeKey, int], FileDigests] = {}
        self._generation = 0

    @property
    def generation(self) -> int:
        return self._generation

    def iter_paths(self, label: str | None = None) -> Iterator[PathRecord]:
        for path in sorted(self.records):
            yield PathRecord(path, "test", self.records[path], "", 0.0)

    def is_trusted(self, digest: bytes) -> bool:
        return digest in self.records.values()

    def digest_cache(self) -> _FakeCache:
        return _FakeCache(self.verifications)

    def record_verification(self, key: InodeKey, digests: FileDigests) -> None:
        self.verifications[(key, digests.size)] = digests

    def record_verifications(self, items: Iterable[tuple[InodeKey, FileDigests]]) -> None:
        for key, digests in items:
            self.record_verification(key, digests)


class Trust:
    """What a test does to the database, for either implementation."""

    def __init__(self, db: FakeTrustDB | TrustDB) -> None:
        self.db = db

    def trust(self, *paths: Path) -> None:
        entries = []
        for p in paths:
            h = hash_file(str(p))
            entries.append(TrustEntry(str(p), h.digests.blake3, h.digests.size, h.digests.kind))
        if isinstance(self.db, FakeTrustDB):
            self.db.records.update((e.path, e.digest) for e in entries)
            self.db._generation += 1
        else:
            self.db.add_entries("manual", "manual", entries)

    def untrust(self, *paths: Path) -> None:
        if isinstance(self.db, FakeTrustDB):
            for p in paths:
                del self.db.records[str(p)]
            self.db._generation += 1
        else:
            self.db.remove_paths([str(p) for p in paths])


@pytest.fixture(params=["lmdb", "fake"])
def trust(request: pytest.FixtureRequest, db_path: Path) -> Iterator[Trust]:
    if request.param == "fake":
        yield Trust(FakeTrustDB())
        return
    try:
        db = TrustDB.open(db_path, write=True)
    except NotImplementedError:
        pytest.xfail("trustdb.db.TrustDB is not implemented yet (trust-database issue)")
    with db:
        yield Trust(db)


def write(path: Path, data: bytes, mode: int = 0o755) -> Path:
    path.write_bytes(data)
    path.chmod(mode)
    return path


def settle() -> None:
    """Let files written just now age past the window in which the database refuses to cache
    a verification (a same-tick write could keep their ctime)."""
    time.sleep(FRESH_CTIME_SECONDS + 0.01)


def synced(trust: Trust, *files: Path) -> tuple[ListSink, Mirror]:
    """Trust `files`, then a mirror synced into a fresh ListSink."""
    trust.trust(*files)
    sink = ListSink()
    mirror = Mirror(trust.db, sink)
    mirror.sync()
    return sink, mirror


def key_of(path: Path) -> InodeKey:
    return InodeKey.from_stat(os.stat(path))


def test_inserts_trusted_files_and_reports_the_rest(trust: Trust, tmp_path: Path) -> None:
    a = write(tmp_path / "a", b"\x7fELF trusted a")
    b = write(tmp_path / "b", b"#!/bin/sh\necho b\n")
    gone = write(tmp_path / "gone", b"soon gone")
    fifo = tmp_path / "fifo"
    trust.trust(a, b, gone)
    os.unlink(gone)
    os.mkfifo(fifo)
    sink = ListSink()
    stats = Mirror(trust.db, sink).sync()
    assert sink.present == {key_of(a), key_of(b)}
    assert (stats.paths, stats.inserted, stats.hashed, stats.mirrored) == (3, 2, 2, 2)
    assert {(s.path, s.reason) for s in stats.skipped} == {(str(gone), REASON_VANISHED)}
    assert stats.summary().startswith("mirrored 2 keys from 3 paths (+2 -0; 0 cached, 2 hashed)")
    assert stats.summary().endswith(f"; 1 skipped: 1 {REASON_VANISHED}")
    if isinstance(trust.db, FakeTrustDB):  # a FIFO cannot be hashed, so only the fake records one
        trust.db.records[str(fifo)] = b"\0" * 32
        stats = Mirror(trust.db, ListSink()).sync()
        assert (str(fifo), REASON_NOT_REGULAR) in {(s.path, s.reason) for s in stats.skipped}


def test_modified_after_trust_is_not_inserted(trust: Trust, tmp_path: Path) -> None:
    f = write(tmp_path / "tool", b"\x7fELF original")
    trust.trust(f)
    f.write_bytes(b"\x7fELF tampered")
    sink = ListSink()
    stats = Mirror(trust.db, sink).sync()
    assert sink.present == set()
    assert [(s.path, s.reason) for s in stats.skipped] == [(str(f), REASON_UNTRUSTED)]


def test_modified_after_mirror_loses_its_key(trust: Trust, tmp_path: Path) -> None:
    f = write(tmp_path / "tool", b"\x7fELF original")
    sink, mirror = synced(trust, f)
    old = key_of(f)
    assert sink.present == {old}
    f.write_bytes(b"\x7fELF tampered")
    stats = mirror.sync()
    assert sink.present == set() and stats.removed == 1
    assert sink.remove_batches == [[old]]


def test_chmod_of_trusted_file_is_rehashed_and_inserted(trust: Trust, tmp_path: Path) -> None:
    f = write(tmp_path / "tool", b"\x7fELF chmod me")
    sink, mirror = synced(trust, f)
    before_key, before_hashes = key_of(f), mirror.hash_count
    f.chmod(0o700)  # moves ctime: the kernel now misses, content is unchanged
    after_key = key_of(f)
    assert after_key != before_key
    assert mirror.verify_file(str(f)) == after_key
    assert mirror.hash_count == before_hashes + 1
    assert after_key in sink.present
    # The first-seen key survives a sync (content still trusted), the old one does not.
    mirror.sync()
    assert sink.present == {after_key}


def test_copy_of_trusted_binary_by_fd(trust: Trust, tmp_path: Path) -> None:
    f = write(tmp_path / "tool", b"\x7fELF copy me")
    trust.trust(f)
    copy = tmp_path / "copy"
    shutil.copy(f, copy)
    sink = ListSink()
    mirror = Mirror(trust.db, sink)
    fd = os.open(copy, os.O_RDONLY)
    try:
        os.read(fd, 3)  # the position is not where the mirror starts reading
        assert mirror.verify_file(fd) == key_of(copy)
    finally:
        os.close(fd)
    assert sink.present == {key_of(copy)}
    other = write(tmp_path / "other", b"\x7fELF never trusted")
    assert mirror.verify_file(str(other)) is None
    assert mirror.verify_file(str(tmp_path / "missing")) is None
    # Untrusting the content removes first-seen keys too.
    trust.untrust(f)
    mirror.sync()
    assert sink.present == set()


def test_verify_file_fast_path_queue_and_cap(
    trust: Trust, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    f = write(tmp_path / "tool", b"\x7fELF first seen")
    trust.trust(f)
    copies = []
    for i in range(3):
        copies.append(tmp_path / f"copy{i}")
        shutil.copy(f, copies[-1])
    settle()
    sink = ListSink()
    mirror = Mirror(trust.db, sink)
    mirror.sync()
    # A key the sink holds already: answered without reading the file.
    assert mirror.verify_file(str(f)) == key_of(f) and mirror.hash_count == 1
    # Verifications made for first-seen files are written by the next refresh, not inline.
    assert mirror.verify_file(str(copies[0])) == key_of(copies[0])
    cache = trust.db.digest_cache()
    assert cache.lookup(key_of(copies[0]), os.stat(copies[0]).st_size) is None
    assert mirror.refresh() is None
    assert cache.lookup(key_of(copies[0]), os.stat(copies[0]).st_size) is not None
    # At most MAX_FIRST_SEEN first-seen keys: the oldest goes first.
    monkeypatch.setattr("trustdb.mirrorfirstseen.MAX_FIRST_SEEN", 2)
    for c in copies[1:]:
        assert mirror.verify_file(str(c)) == key_of(c)
    assert sink.present == {key_of(f), key_of(copies[1]), key_of(copies[2])}


def test_verify_file_reads_an_untrusted_binary_once_and_data_never(
    trust: Trust, tmp_path: Path
) -> None:
    trust.trust(write(tmp_path / "trusted", b"\x7fELF trusted"))
    mirror = Mirror(trust.db, ListSink())
    evil = write(tmp_path / "evil", b"\x7fELF untrusted")
    assert mirror.verify_file(str(evil)) is None and mirror.hash_count == 1
    assert mirror.verify_file(str(evil)) is None and mirror.hash_count == 1  # remembered
    data = write(tmp_path / "data.txt", b"plain text, no exec bit", mode=0o644)
    assert mirror.verify_file(str(data)) is None and mirror.hash_count == 1  # never read


def test_verify_file_while_syncing(trust: Trust, tmp_path: Path) -> None:
    """The fanotify thread inserts first-seen keys while the main thread re-syncs: no key is
    lost or removed by mistake, and the sink always holds exactly the mirror's keys."""
    f = write(tmp_path / "tool", b"\x7fELF shared")
    copies = []
    for i in range(40):
        copies.append(tmp_path / f"copy{i}")
        shutil.copy(f, copies[-1])
    sink, mirror = synced(trust, f)
    errors: list[BaseException] = []

    def prewarm() -> None:
        try:
            for c in copies:
                assert mirror.verify_file(str(c)) == key_of(c)
        except BaseException as e:  # noqa: BLE001 - reported by the main thread
            errors.append(e)

    t = threading.Thread(target=prewarm)
    t.start()
    for _ in range(20):
        mirror.sync()
    t.join(30)
    assert not errors and not t.is_alive()
    mirror.sync()
    assert sink.present == mirror.keys == {key_of(p) for p in [f, *copies]}


def test_cache_hit_does_not_read_again(trust: Trust, tmp_path: Path) -> None:
    files = [write(tmp_path / f"f{i}", b"\x7fELF %d" % i) for i in range(20)]
    trust.trust(*files)
    settle()
    first = Mirror(trust.db, ListSink())
    cold = first.sync()
    assert (cold.hashed, first.hash_count) == (20, 20)
    # A restart: a new mirror over the same database reads nothing.
    second = Mirror(trust.db, ListSink())
    warm = second.sync()
    assert (warm.cached, warm.hashed, second.hash_count, warm.inserted) == (20, 0, 0, 20)


def test_batches_and_refresh(trust: Trust, tmp_path: Path) -> None:
    files = [write(tmp_path / f"f{i}", b"\x7fELF %d" % i) for i in range(5)]
    trust.trust(*files)
    settle()
    sink = ListSink()
    mirror = Mirror(trust.db, sink, batch_size=2)
    mirror.sync()
    assert [len(b) for b in sink.add_batches] == [2, 2, 1]
    assert mirror.refresh() is None  # generation unchanged: nothing to do
    trust.untrust(files[0])
    stats = mirror.refresh()
    assert stats is not None and (stats.removed, stats.inserted) == (1, 0)
    assert sink.present == {key_of(f) for f in files[1:]}
    extra = write(tmp_path / "extra", b"\x7fELF extra")
    trust.trust(extra)
    stats = mirror.refresh()
    assert stats is not None and (stats.inserted, stats.removed) == (1, 0)
    # The unchanged paths: re-examined (all cached) by a full sync; an LMDB database keeps a
    # change log (SCHEMA: L), and its refresh looks at the one changed path only.
    assert (stats.paths, stats.cached) == ((1, 0) if isinstance(trust.db, TrustDB) else (5, 4))
    assert sink.present == {key_of(f) for f in [*files[1:], extra]}


def test_coarse_ctime_defers_until_the_tick_passed(
    trust: Trust, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    f = write(tmp_path / "fresh", b"\x7fELF fresh")
    trust.trust(f)
    # A coarse clock 50 ms behind (a long tick): the file is surely inside the current tick
    # however slowly this shared machine runs the next lines.
    lag = 50_000_000
    monkeypatch.setattr("trustdb.fskeys.coarse_now_ns", lambda: coarse_now_ns() - lag)
    os.utime(f)  # ctime = now
    sink = ListSink()
    started = time.monotonic()
    stats = Mirror(trust.db, sink, multigrain=False).sync()
    assert stats.deferred == 1 and sink.present == {key_of(f)}
    assert time.monotonic() - started >= 0.03  # it waited for the clock
    # Verified only once the coarse clock was past the ctime: any later write moves the key.
    assert coarse_now_ns() - lag >= ctime_settled_at(os.stat(f))
    # With multigrain ctime (6.13+ on ext4/tmpfs) nothing needs to wait.
    os.utime(f)
    stats = Mirror(trust.db, ListSink(), multigrain=True).sync()
    assert stats.deferred == 0 and stats.inserted == 1


def test_ctime_rules() -> None:
    assert kernel_has_multigrain("6.18.44-fc-v595") and kernel_has_multigrain("6.13.0")
    assert not kernel_has_multigrain("6.12.95+deb12-amd64")
    assert not kernel_has_multigrain("6.1.0-35-amd64")

    def at(ctime_ns: int) -> int:
        st = os.stat_result((0o100644, 1, 1, 1, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, ctime_ns))
        return ctime_settled_at(st) - ctime_ns

    assert at(5 * 10**9) == 2 * 10**9  # seconds (or vfat's two): wait them out
    assert at(5 * 10**9 + 120_000_000) == 10**7  # exfat: 10 ms
    assert at(5 * 10**9 + 123_456_700) == 100  # cifs, ntfs: 100 ns
    assert at(5 * 10**9 + 123_456_789) == 1


def test_recreated_inode_gets_another_key(trust: Trust, tmp_path: Path) -> None:
    """Delete a verified file and create another at once: ext4 hands out the same inode
    number, and only ctime tells the two apart (multigrain here, the coarse-clock rule before
    6.13)."""
    good = write(tmp_path / "tool", b"\x7fELF trusted")
    trust.trust(good)
    sink = ListSink()
    mirror = Mirror(trust.db, sink)
    old = mirror.verify_file(str(good))
    assert old is not None
    os.unlink(good)
    evil = write(tmp_path / "tool2", b"\x7fELF evil")
    new = key_of(evil)
    assert new != old
    assert mirror.verify_file(str(evil)) is None and new not in sink.present


@pytest.fixture
def mounted(tmp_path: Path, as_root: None) -> Iterator[list[Path]]:
    """Mount points a test made; unmounted whatever happens."""
    points: list[Path] = []
    yield points
    for p in reversed(points):
        subprocess.run(["umount", "-l", str(p)], check=False)


@pytest.mark.root
def test_tmpfs_keys_match_stat(trust: Trust, tmp_path: Path, mounted: list[Path]) -> None:
    mnt = tmp_path / "tmpfs"
    mnt.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "none", str(mnt)], check=True)
    mounted.append(mnt)
    f = write(mnt / "tool", b"\x7fELF on tmpfs")
    trust.trust(f)
    sink = ListSink()
    stats = Mirror(trust.db, sink).sync()
    assert stats.inserted == 1 and sink.present == {key_of(f)}


def make_overlay(tmp_path: Path, mounted: list[Path], lower: Path | None = None) -> Path:
    """An overlay mount of `lower` (default: a fresh dir beside it) under tmp_path; returns
    the merged directory."""
    lower = lower or tmp_path / "lower"
    upper, work, merged = (tmp_path / n for n in ("upper", "work", "merged"))
    for d in (lower, upper, work, merged):
        d.mkdir(exist_ok=True)
    opts = f"lowerdir={lower},upperdir={upper},workdir={work}"
    subprocess.run(["mount", "-t", "overlay", "overlay", "-o", opts, str(merged)], check=True)
    mounted.append(merged)
    return merged


@pytest.mark.root
def test_overlayfs_gets_the_overlay_and_the_real_key(
    trust: Trust, tmp_path: Path, mounted: list[Path]
) -> None:
    (tmp_path / "lower").mkdir()
    write(tmp_path / "lower" / "tool", b"\x7fELF in a lower layer")
    merged = make_overlay(tmp_path, mounted)
    tool, made = merged / "tool", write(merged / "made", b"\x7fELF made in the upper layer")
    assert fs_magic(str(tool)) == OVERLAYFS_SUPER_MAGIC
    sink, mirror = synced(trust, tool, made)
    expected = {
        key_of(tool),  # what an exec of it sees (the overlay inode)
        key_of(tmp_path / "lower" / "tool"),  # what a mapping of it sees (the real inode)
        key_of(made),
        key_of(tmp_path / "upper" / "made"),
    }
    assert len(expected) == 4 and sink.present == expected
    # First seen through an fd, e.g. a copy made inside the overlay: both keys again.
    copy = merged / "copy"
    shutil.copy(tool, copy)
    fd = os.open(copy, os.O_RDONLY)
    try:
        assert mirror.verify_file(fd) == key_of(copy)
    finally:
        os.close(fd)
    assert {key_of(copy), key_of(tmp_path / "upper" / "copy")} <= sink.present


@pytest.mark.root
def test_overlayfs_on_two_filesystems_is_reported_not_mis_keyed(
    trust: Trust, tmp_path: Path, mounted: list[Path]
) -> None:
    lower = tmp_path / "lower-tmpfs"
    lower.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "none", str(lower)], check=True)
    mounted.append(lower)
    write(lower / "tool", b"\x7fELF on tmpfs under an ext4 upper layer")
    merged = make_overlay(tmp_path, mounted, lower)
    tool = merged / "tool"
    sink, mirror = synced(trust, tool)
    stats = mirror.sync()
    assert sink.present == set() and stats.inserted == 0
    assert [(s.path, s.reason) for s in stats.skipped] == [(str(tool), REASON_OVERLAY_UNRESOLVED)]
    assert mirror.verify_file(str(tool)) is None and sink.present == set()


def test_mountinfo_layers(tmp_path: Path) -> None:
    info = tmp_path / "mountinfo"
    info.write_text(
        "36 35 98:0 / /mnt/a\\040b rw - ext4 /dev/root rw\n"
        "40 35 0:39 / /merged rw,relatime - overlay overlay "
        "rw,lowerdir=/l1:/l\\:2::/data,upperdir=/up,workdir=/w\n"
        "41 35 0:40 / /m2 rw - overlay overlay rw,lowerdir+=/x,lowerdir+=/y\n"
    )
    assert overlay_mounts(str(info)) == [
        OverlayMount("/merged", ("/up", "/l1", "/l:2", "/data")),
        OverlayMount("/m2", ("/x", "/y")),
    ]


# --- against the real kernel: the mirror's keys are the ones the BPF hooks compute -------------


def _collect(reader: EventReader, got: list[Decision], until: Callable[[], bool]) -> None:
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline and not until():
        reader.poll(100)


@pytest.mark.root
@pytest.mark.bpf
def test_mirrored_keys_match_the_kernel_and_events_come_back(
    audit: Confined, tmp_path: Path, db_path: Path
) -> None:
    """Audit mode, scoped to a test cgroup: nothing is denied, every would-deny is an event."""
    trusted = closure(["true"])
    untrusted = tmp_path / "mytrue"
    shutil.copyfile(shutil.which("true") or "/bin/true", untrusted)
    with open(untrusted, "ab") as f:
        f.write(b"not the trusted content")
    untrusted.chmod(0o755)
    with TrustDB.open(db_path, write=True) as db:
        t = Trust(db)
        t.trust(*(Path(p) for p in trusted))
        mirror = Mirror(db, audit.engine.trusted_inodes)
        stats = mirror.sync()
        assert stats.inserted == len(trusted), stats.skipped
        got: list[Decision] = []
        with EventReader(
            audit.engine.events_fd, EventSink(audit.engine.backend_name, got.append)
        ) as reader:
            r = audit.run([str(untrusted)])
            assert r.returncode == 0, r.stderr  # audit: allowed
            assert audit.run([os.path.realpath(shutil.which("true") or "")]).returncode == 0
            key = key_of(untrusted)

            def denied_untrusted() -> bool:
                return any((d.dev, d.ino) == (key.dev, key.ino) for d in got)

            _collect(reader, got, denied_untrusted)
            mine = [d for d in got if (d.dev, d.ino) == (key.dev, key.ino)]
            assert mine, got
            d = mine[0]
            assert (d.hook, d.verdict, d.reason) == (
                Hook.EXEC,
                Verdict.AUDIT_DENY,
                REASON_UNTRUSTED_EXEC,
            )
            assert d.mode == Mode.AUDIT and d.backend == audit.engine.backend_name
            assert d.path.endswith("mytrue") and d.tgid > 0 and d.comm
            # Nothing mirrored from the database was judged untrusted: exec of true, and the
            # mmap of ld.so and libc, found the keys the mirror computed with stat().
            trusted_inodes = {(key_of(Path(p)).dev, key_of(Path(p)).ino) for p in trusted}
            assert not [x for x in got if x.denied and (x.dev, x.ino) in trusted_inodes], got
            # Trust the content now: the refresh inserts it and the next exec is not reported.
            t.trust(untrusted)
            assert mirror.refresh() is not None
            got.clear()
            assert audit.run([str(untrusted)]).returncode == 0
            _collect(reader, got, lambda: bool(got))
            reader.drain()
            assert not [x for x in got if x.denied and (x.dev, x.ino) == (key.dev, key.ino)], got


# --- on kernels with coarse ctime (6.1, 6.12 in QEMU): the clock rule closes the hole ----------

GUEST_CTIME_SCRIPT = r"""
import os, sys
sys.path.insert(0, sys.argv[1])
from trustdb.hashing import hash_file
from trustdb.mirror import Mirror, kernel_has_multigrain
from trustdb.model import InodeKey

class DB:  # the few calls the mirror makes, in memory
    generation = 1
    def __init__(self, path, digest):
        self.path, self.digest = path, digest
    def iter_paths(self, label=None):
        return iter([type("R", (), {"path": self.path})()])
    def is_trusted(self, d):
        return d == self.digest
    def digest_cache(self):
        return self
    def lookup(self, key, size):
        return None
    def record_verification(self, key, digests):
        pass
    def record_verifications(self, items):
        pass

class Sink:
    def __init__(self):
        self.keys = set()
    def add(self, keys):
        self.keys.update(keys)
    def remove(self, keys):
        self.keys.difference_update(keys)

assert not kernel_has_multigrain(), os.uname().release
path, tries = "/tmp/ctime-probe", 200
result = {}
for label, rule in (("rule", None), ("no-rule", True)):
    still_matching = 0
    for _ in range(tries):
        with open(path, "wb") as f:
            f.write(b"\x7fELF trusted")
        digest = hash_file(path).digests.blake3
        sink = Sink()
        Mirror(DB(path, digest), sink, multigrain=rule).sync()
        with open(path, "r+b") as f:  # modify right after the mirror verified it
            f.write(b"\x7fELF evil!!")
        if InodeKey.from_stat(os.stat(path)) in sink.keys:
            still_matching += 1
        os.unlink(path)
    result[label] = still_matching
same = 0  # the hole itself: a write right after a stat keeps the ctime
for _ in range(tries):
    with open(path, "wb") as f:
        f.write(b"a")
    before = os.stat(path).st_ctime_ns
    with open(path, "r+b") as f:
        f.write(b"b")
    same += os.stat(path).st_ctime_ns == before
    os.unlink(path)
result["raw"] = same
print("CTIME-RESULT " + " ".join(f"{k}={v}/{tries}" for k, v in result.items()))
sys.exit(0 if result["rule"] == 0 else 1)
"""


@pytest.mark.vm
@pytest.mark.slow
@pytest.mark.parametrize("kernel", ["6.1", "6.12"])
def test_coarse_ctime_rule_on_coarse_kernels(kernel: str) -> None:
    """Write right after the mirror verified a file, 200 times: with the clock rule the key in
    the map never matches the modified file. Controls: the same without the rule, and a write
    right after a bare stat (which keeps the ctime most of the time on these kernels)."""
    from tests.vm import runner

    try:
        runner.find_kernel(kernel)
    except runner.VmError as e:
        pytest.fail(str(e))  # packaging/install-deps.sh installs both kernels
    python = os.path.realpath(sys.executable)
    result = runner.run(kernel, [python, "-c", GUEST_CTIME_SCRIPT, str(runner.REPO)], timeout=600)
    lines = [x for x in result.console.splitlines() if "CTIME-RESULT" in x]
    tail = "\n".join(result.console.splitlines()[-30:])
    assert lines and result.returncode == 0, f"{kernel}: exit {result.returncode}\n{tail}"
    print(f"{kernel}: {lines[-1].strip()}")
    raw = int(lines[-1].split("raw=")[1].split("/")[0])
    assert raw > 0, "a write never kept the ctime: is this kernel's ctime coarse?"


@pytest.mark.root
@pytest.mark.bpf
def test_overlay_keys_match_the_kernel_for_exec_and_mmap(
    audit: Confined, tmp_path: Path, db_path: Path, mounted: list[Path]
) -> None:
    """On an overlay: exec of a trusted file (overlay inode) and `ld.so FILE` (its mapping: the
    real inode) are both found in the map; an untrusted file beside it is reported."""
    (tmp_path / "lower").mkdir()
    shutil.copyfile(shutil.which("true") or "/bin/true", tmp_path / "lower" / "tool")
    (tmp_path / "lower" / "tool").chmod(0o755)
    merged = make_overlay(tmp_path, mounted)
    tool, evil = merged / "tool", merged / "evil"
    shutil.copyfile(tool, evil)
    with open(evil, "ab") as f:
        f.write(b"untrusted")
    evil.chmod(0o755)
    trusted = closure(["true"])
    ldso = next(p for p in trusted if "ld-linux" in p)
    with TrustDB.open(db_path, write=True) as db:
        Trust(db).trust(tool, *(Path(p) for p in trusted))
        stats = Mirror(db, audit.engine.trusted_inodes).sync()
        assert stats.inserted == len(trusted) + 2 and not stats.skipped, stats.summary()
        got: list[Decision] = []
        sink = EventSink(audit.engine.backend_name, got.append)
        with EventReader(audit.engine.events_fd, sink) as reader:
            assert audit.run([str(tool)]).returncode == 0
            assert audit.run([ldso, str(tool)]).returncode == 0
            assert audit.run([str(evil)]).returncode == 0
            evil_ino = os.stat(evil).st_ino
            _collect(reader, got, lambda: any(d.ino == evil_ino for d in got))
            reader.drain()
    assert any(d.ino == evil_ino and d.denied for d in got), got  # the reader saw events
    tool_ino = os.stat(tool).st_ino
    assert not [d for d in got if d.ino == tool_ino and d.denied], got


def test_refresh_applies_only_the_change(db_path: Path, tmp_path: Path) -> None:
    """The change log (SCHEMA: L) drives refresh: removed paths lose their keys unless a hard
    link still holds them, content trusted elsewhere lets an untrusted path in, and content no
    source trusts any more takes every key holding it out."""
    a = write(tmp_path / "a", b"\x7fELF a")
    h1 = write(tmp_path / "h1", b"\x7fELF linked")
    h2 = tmp_path / "h2"
    os.link(h1, h2)
    p = write(tmp_path / "p", b"\x7fELF p, trusted")
    with TrustDB.open(db_path, write=True) as db:
        trust = Trust(db)
        trust.trust(a, h1, h2, p)
        p.write_bytes(b"\x7fELF p, changed")  # recorded, but its content is trusted nowhere
        q = write(tmp_path / "q", b"\x7fELF p, changed")
        settle()
        sink = ListSink()
        mirror = Mirror(db, sink)
        mirror.sync()
        assert key_of(p) not in sink.present and key_of(h1) in sink.present

        trust.untrust(a, h1)
        stats = mirror.refresh()
        assert stats is not None and stats.paths == 2 and stats.removed == 1
        assert key_of(a) not in sink.present and key_of(h2) in sink.present  # h2 holds it

        trust.trust(q)  # p's content is now trusted (through q): p gets its key too
        stats = mirror.refresh()
        assert stats is not None and stats.paths == 2
        assert {key_of(p), key_of(q)} <= sink.present

        trust.untrust(q)  # no source trusts that content any more: both keys go
        stats = mirror.refresh()
        assert stats is not None and stats.removed == 2
        assert key_of(p) not in sink.present and key_of(q) not in sink.present
        assert sink.present == mirror.keys == {key_of(h2)}
        full = Mirror(db, ListSink())
        full.sync()
        assert full.keys == mirror.keys  # the same as a full sync would give


def test_kernel_map_is_sized_from_the_database(db_path: Path) -> None:
    from trustdb.mirror import MAX_FIRST_SEEN, map_size_for

    assert map_size_for(0) == 1 << 16  # the first-seen keys alone
    assert map_size_for(137_000) == 1 << 19  # two keys per path + first-seen, a power of two
    assert map_size_for(1_000_000) == 1 << 21  # past the old fixed 1M
    for n in (1, 5000, 300_000, 3_000_000):
        assert map_size_for(n) >= 2 * n + MAX_FIRST_SEEN
    with TrustDB.open(db_path, write=True) as db:
        db.add_entries("a", "manual", [TrustEntry(f"/x/{i}", bytes([i]) * 32, 1, FileKind.ELF)
                                       for i in range(3)])
        db.add_entries("b", "manual", [TrustEntry("/x/0", bytes(32), 1, FileKind.ELF)])
        assert db.entry_count() == 4 == db.status().entries
