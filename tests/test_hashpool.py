"""Hashing on worker processes against real files: order, bad input, a dying worker, memory,
and the restartable stream a source write takes instead of a replay buffer (real LMDB)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import blake3
import pytest

from trustdb.db import TrustDB
from trustdb.hashing import HashingError, hash_file
from trustdb.hashpool import BATCH, HashPool, HashRequest, unpack
from trustdb.model import FileKind, SkippedEntry, TrustEntry
from trustdb.walk import scan


def make_files(root: Path, n: int) -> list[str]:
    root.mkdir(parents=True, exist_ok=True)
    paths = []
    for i in range(n):
        p = root / f"f{i:05d}"
        p.write_bytes(b"\x7fELF" + i.to_bytes(4, "big") * (i % 7 + 1))
        paths.append(str(p))
    return paths


def test_workers_hash_in_order_and_match_hash_file(tmp_path: Path) -> None:
    paths = make_files(tmp_path / "t", 5 * BATCH + 3)  # enough batches to use the workers
    with HashPool(workers=2) as pool:
        got = list(pool.hash_paths(paths))
    assert [p for p, _ in got] == paths
    for path, packed in got:
        assert isinstance(packed, tuple)
        want = hash_file(path, follow_symlinks=False)
        hashed = unpack(packed)
        assert hashed.digests.blake3 == want.digests.blake3 == blake3.blake3(
            Path(path).read_bytes()
        ).digest()
        assert hashed.digests.kind is FileKind.ELF and hashed.inode == want.inode


def test_bad_input_is_one_line_per_file_not_a_crash(tmp_path: Path) -> None:
    paths = make_files(tmp_path / "t", 3 * BATCH)
    fifo = tmp_path / "t" / "fifo"
    os.mkfifo(fifo)
    link = tmp_path / "t" / "link"
    link.symlink_to(paths[0])
    bad = [str(fifo), str(tmp_path / "t" / "vanished"), str(link)]
    with HashPool(workers=2) as pool:
        got = dict(pool.hash_paths(paths[:BATCH] + bad + paths[BATCH:]))
    assert got[str(fifo)] == "not a regular file"  # opened O_NONBLOCK: never blocks
    assert got[str(tmp_path / "t" / "vanished")] == "vanished (no such file)"
    assert isinstance(got[str(link)], str)  # a symlink inside a walk is not followed
    assert all(isinstance(got[p], tuple) for p in paths)


def test_non_executable_files_are_not_read(tmp_path: Path) -> None:
    root = tmp_path / "t"
    paths = make_files(root, 2 * BATCH)
    doc = root / "README"
    doc.write_text("just text\n")
    with HashPool(workers=2) as pool:
        got = dict(pool.hash_paths([*paths, str(doc)], HashRequest(executable_only=True)))
    assert got[str(doc)] is None
    assert all(isinstance(got[p], tuple) for p in paths)


def test_a_killed_worker_is_a_hashing_error(tmp_path: Path) -> None:
    paths = make_files(tmp_path / "t", 20 * BATCH)
    with HashPool(workers=2) as pool:
        results = pool.hash_paths(paths)
        next(results)
        for w in pool._procs:
            os.kill(w.process.pid or 0, signal.SIGKILL)
        with pytest.raises(HashingError, match="hashing worker stopped"):
            list(results)


def test_fork_after_blake3_threads_does_not_hang(tmp_path: Path) -> None:
    """blake3's thread pool is not fork-safe: a huge file hashed in-process first, then
    workers forked, used to hang for ever in the child."""
    huge = tmp_path / "huge"
    with open(huge, "wb") as f:
        f.truncate(80 << 20)  # over HUGE_FILE: blake3 starts its threads in this process
    paths = make_files(tmp_path / "t", 3 * BATCH)
    code = textwrap.dedent(
        f"""
        from trustdb.hashing import hash_file
        from trustdb.hashpool import HashPool
        hash_file({str(huge)!r})
        with HashPool(workers=2) as pool:
            n = sum(isinstance(r, tuple) for _p, r in pool.hash_paths({paths!r} + [{str(huge)!r}]))
        print(n)
        """
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=True
    )
    assert out.stdout.strip() == str(len(paths) + 1)


def test_scan_on_workers_records_what_the_walk_finds(tmp_path: Path) -> None:
    root = tmp_path / "t"
    paths = make_files(root, 3 * BATCH)
    (root / "notes.txt").write_text("text\n")
    with HashPool(workers=2) as pool:
        items = list(scan([str(root)], pool=pool))
    entries = [i for i in items if isinstance(i, TrustEntry)]
    assert sorted(e.path for e in entries) == sorted(paths)
    assert not [i for i in items if isinstance(i, SkippedEntry)]


def test_a_callable_source_is_asked_again_when_the_map_grows(tmp_path: Path) -> None:
    """No replay buffer: a full map aborts the transaction, the map grows, and the writer asks
    the callable for a fresh stream. The result is the same as one uninterrupted write."""
    calls = 0

    def produce() -> list[TrustEntry]:
        nonlocal calls
        calls += 1
        return [
            TrustEntry(f"/f/{i:06d}", i.to_bytes(32, "big"), i, FileKind.ELF)
            for i in range(20_000)
        ]

    with TrustDB.open(tmp_path / "db", write=True, map_size=256 << 10) as db:
        stats = db.add_entries("big", "manual", produce)
        assert calls >= 2  # the first attempt filled the 256 KiB map
        assert stats.added == 20_000
        assert db.status().entries == 20_000 and db.status().contents == 20_000


def test_trust_cli_uses_workers_and_writes_everything(tmp_path: Path) -> None:
    root = tmp_path / "t"
    paths = make_files(root, 4 * BATCH)
    env = dict(os.environ, TRUSTDB_DB=str(tmp_path / "db"))
    out = subprocess.run(
        [sys.executable, "-c", "from trustdb.cli import main; main()", "trust", "-q", str(root)],
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
        check=False,
    )
    assert out.returncode == 0, out.stderr
    with TrustDB.open(tmp_path / "db") as db:
        assert db.entry_count() == len(paths)
        for p in paths[:: BATCH // 2]:
            assert db.is_trusted(blake3.blake3(Path(p).read_bytes()).digest())
