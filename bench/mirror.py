"""Mirror cost: a cold sync (empty verification cache: every file read and hashed) against a
warm one (a restart: every file found in the cache, a stat per path), in one run.

Baseline: the cold sync. Files are copies of the binaries in /usr/bin (real sizes), in a
temporary directory on the disk of the tmp dir; the page cache is warm in both cases (dropping
it would slow every other user of this shared machine), so "cold" measures hashing, not I/O.

    python3 bench/mirror.py [--files N] [--rounds R]
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import sys
import tempfile
import time
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from trustdb.db import PathRecord, TrustDB
from trustdb.hashing import hash_file
from trustdb.mirror import Mirror, MirrorSource, MirrorStats
from trustdb.model import FileDigests, InodeKey, TrustEntry


class CountingSink:
    def __init__(self) -> None:
        self.count = 0

    def add(self, keys: Sequence[InodeKey]) -> None:
        self.count += len(keys)

    def remove(self, keys: Sequence[InodeKey]) -> None:
        self.count -= len(keys)


class DictDB:
    """Stand-in used only while trustdb.db.TrustDB is not implemented (printed when used)."""

    def __init__(self, entries: list[TrustEntry]) -> None:
        self._paths = {e.path: e.digest for e in entries}
        self._digests = set(self._paths.values())
        self._cache: dict[tuple[InodeKey, int], FileDigests] = {}

    generation = 1

    def iter_paths(self, label: str | None = None) -> Iterator[PathRecord]:
        return (PathRecord(p, "bench", d, "", 0.0) for p, d in sorted(self._paths.items()))

    def is_trusted(self, digest: bytes) -> bool:
        return digest in self._digests

    def digest_cache(self) -> DictDB:
        return self

    def lookup(self, key: InodeKey, size: int) -> FileDigests | None:
        return self._cache.get((key, size))

    def record_verification(self, key: InodeKey, digests: FileDigests) -> None:
        self._cache[(key, digests.size)] = digests

    def record_verifications(self, items: Iterable[tuple[InodeKey, FileDigests]]) -> None:
        for key, digests in items:
            self.record_verification(key, digests)


def make_files(root: Path, n: int) -> list[TrustEntry]:
    sources = sorted(p for p in Path("/usr/bin").iterdir() if p.is_file() and not p.is_symlink())
    entries = []
    for i in range(n):
        dst = root / f"f{i:06d}"
        shutil.copyfile(sources[i % len(sources)], dst)
        # A distinct tail per copy: each file is its own content, as on a real system.
        with open(dst, "ab") as f:
            f.write(b"%d" % i)
        h = hash_file(str(dst))
        entries.append(TrustEntry(str(dst), h.digests.blake3, h.digests.size, h.digests.kind))
    return entries


def open_db(root: Path, entries: list[TrustEntry]) -> tuple[MirrorSource, str]:
    try:
        db = TrustDB.open(root / "db", write=True)
    except NotImplementedError:
        return DictDB(entries), "in-memory stand-in (TrustDB not implemented)"
    db.add_entries("bench", "manual", entries)
    return db, "LMDB TrustDB"


def timed_sync(db: MirrorSource) -> MirrorStats:
    return Mirror(db, CountingSink()).sync()


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--files", type=int, default=3000)
    ap.add_argument("--rounds", type=int, default=3)
    args = ap.parse_args()
    cold: list[float] = []
    warm: list[float] = []
    total_bytes = 0
    with tempfile.TemporaryDirectory(prefix="trustdb-bench-") as tmp:
        for r in range(args.rounds):
            root = Path(tmp) / f"r{r}"
            (root / "db").mkdir(parents=True)
            entries = make_files(root, args.files)
            total_bytes = sum(e.size for e in entries)
            db, kind = open_db(root, entries)
            time.sleep(0.1)  # past the ctime window in which the database will not cache
            c = timed_sync(db)
            w = timed_sync(db)
            assert c.hashed == args.files and w.cached == args.files and w.hashed == 0, (c, w)
            cold.append(c.elapsed)
            warm.append(w.elapsed)
            close = getattr(db, "close", None)
            if close is not None:
                close()
            shutil.rmtree(root)
    c_med, w_med = statistics.median(cold), statistics.median(warm)
    print(f"mirror of {args.files} files ({total_bytes / 1e6:.0f} MB), database: {kind}")
    print(
        f"  cold (hash every file):     {c_med * 1e3:8.1f} ms  ({total_bytes / c_med / 1e9:.2f} GB/s)"
    )
    print(
        f"  warm (verification cache):  {w_med * 1e3:8.1f} ms  ({w_med / args.files * 1e6:.1f} us/file)"
    )
    print(f"  warm / cold = x{w_med / c_med:.3f}   (cold is x{c_med / w_med:.1f} the warm sync)")


if __name__ == "__main__":
    main()
