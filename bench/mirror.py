"""Mirror cost: a cold sync (empty verification cache: every file read and hashed) against a
warm one (a restart: every file found in the cache, a stat per path), in one run.

Baseline: the cold sync. Files are copies of the binaries in /usr/bin (real sizes), in a
temporary directory on the disk of the tmp dir; the page cache is warm in both cases (dropping
it would slow every other user of this shared machine), so "cold" measures hashing, not I/O.

Also the first-seen path: `Mirror.verify_file` on fresh copies of /usr/bin/git (what an exec of
a copied or chmod'ed trusted binary costs before the kernel decides), against the same call once
the key is known (the fast path every other exec takes through the pre-warm hook).

Then, at database sizes (--sizes, default 10k, 137k and 1M entries; files on disk under
/var/tmp, tiny and distinct), in alternating rounds: a start that walks the whole database
before the attach (the baseline: the service's start before), against a start on a map primed
from the verification cache alone (`Mirror.prime`: what the service and `trustdb run` attach on
now, the walk following the attach on a thread; goal: 137k in under 1 s, fapolicyd's 54.7 s
named beside it), against the adopt road's read of a pinned map's keys, and against a refresh
after one `trust` of a new file and one `untrust` (goal: in proportion to the change, not the
database). The floor is the baseline against itself, measured in the same rounds.

With --kernel-map both starts load the tracepoint backend's object (never attached) with its
map sized from the database as the service sizes it, and fill that real BPF map.

    python3 bench/mirror.py [--files N] [--rounds R] [--sizes 10000,137000,1000000]
                            [--kernel-map] [--sizes-only]
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from trustdb.db import TrustDB
from trustdb.hashing import hash_file
from trustdb.mirror import Mirror, MirrorSource, MirrorStats
from trustdb.model import InodeKey, TrustEntry


class CountingSink:
    def __init__(self) -> None:
        self.count = 0

    def add(self, keys: Sequence[InodeKey]) -> None:
        self.count += len(keys)

    def remove(self, keys: Sequence[InodeKey]) -> None:
        self.count -= len(keys)


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


def open_db(root: Path, entries: list[TrustEntry]) -> TrustDB:
    db = TrustDB.open(root / "db", write=True)
    db.add_entries("bench", "manual", entries)
    return db


def timed_sync(db: MirrorSource) -> MirrorStats:
    return Mirror(db, CountingSink()).sync()


FIRST_SEEN_BINARY = os.path.realpath(
    "/usr/bin/git" if os.path.exists("/usr/bin/git") else "/bin/sh"
)
"""A large, common binary: the first-seen cost is mostly hashing it."""


def first_seen(root: Path, db: TrustDB, copies: int = 40) -> tuple[float, float]:
    """Median seconds of verify_file on fresh copies of a trusted binary (the exec of a copy
    or of a chmod'ed file), then on the same files again (key already in the map)."""
    h = hash_file(FIRST_SEEN_BINARY)
    db.add_entries(
        "bench-first-seen",
        "manual",
        [TrustEntry(FIRST_SEEN_BINARY, h.digests.blake3, h.digests.size, h.digests.kind)],
    )
    paths = []
    for i in range(copies):
        paths.append(str(root / f"copy{i}"))
        shutil.copyfile(FIRST_SEEN_BINARY, paths[-1])
    time.sleep(0.1)
    mirror = Mirror(db, CountingSink())
    unknown, known = [], []
    for p in paths:
        t0 = time.perf_counter()
        assert mirror.verify_file(p) is not None
        t1 = time.perf_counter()
        mirror.verify_file(p)
        known.append(time.perf_counter() - t1)
        unknown.append(t1 - t0)
    return statistics.median(unknown), statistics.median(known)


def make_tree(root: Path, n: int) -> list[str]:
    """n tiny files with distinct content, 1000 per directory."""
    paths = []
    for i in range(n):
        d = root / f"d{i // 1000:04d}"
        if i % 1000 == 0:
            d.mkdir(parents=True)
        p = f"{d}/f{i:07d}"
        fd = os.open(p, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o755)
        os.write(fd, b"\x7fELF %d" % i)
        os.close(fd)
        paths.append(p)
    return paths


class KernelMap:
    """The tracepoint backend's trusted-inode map, loaded in this kernel and never attached
    (audit mode, a scope no task is in): a sync into it pays the real bpf() batch inserts, as
    the service's start does."""

    def __init__(self, entries: int) -> None:
        from trustdb.abi import Mode
        from trustdb.backends.interface import EngineConfig, Scope
        from trustdb.backends.tracepoint import TracepointBackend
        from trustdb.mirror import map_size_for

        self.max_entries = map_size_for(entries)
        self._backend = TracepointBackend()
        self._backend.load(EngineConfig(mode=Mode.AUDIT, scope=Scope(cgroup_id=1, cgroup_level=99),
                                        max_entries=self.max_entries, events_bytes=4096))
        self.sink = self._backend.trusted_inodes
        self.map = self._backend.map("trusted_inodes")

    def close(self) -> None:
        self._backend.detach()


FAPOLICYD_137K_S = 54.7
"""fapolicyd 1.1.7 loading 137k entries on this machine kind (issue 11): the named outside
baseline for the service's start."""


def _median_ratio(a: list[float], b: list[float]) -> float:
    return statistics.median(x / y for x, y in zip(a, b, strict=True))


def bench_sizes(sizes: list[int], rounds: int, kernel_map: bool = False) -> None:
    """Per size, in alternating rounds: the start that walks the database before the attach
    (the baseline: how the service started before), the start on a primed map (what the
    service and `run` do now when the verification cache covers the database), the adopt
    road's read of a pinned map's keys, and a refresh after +1 -1 entries. With --kernel-map
    both starts include loading the BPF object with its map sized from the database."""
    from trustdb.walk import scan

    where = ("the kernel's map (object loaded, never attached)" if kernel_map
             else "a counting sink")
    print(f"start and refresh by database size, into {where} (load {os.getloadavg()[0]:.2f}, "
          f"{os.cpu_count()} CPUs; medians of {rounds} alternating rounds; floor = walk vs the "
          "same walk again)")
    for n in sizes:
        with tempfile.TemporaryDirectory(prefix="trustdb-bench-size-", dir="/var/tmp") as tmp:
            root = Path(tmp)
            make_tree(root / "files", n)
            time.sleep(0.1)  # past the window in which the database will not cache
            db = TrustDB.open(root / "db", write=True)
            t0 = time.perf_counter()
            db.add_entries("bench", "dir", scan([str(root / "files")], all_files=True))
            built = time.perf_counter() - t0
            mirror = Mirror(db, CountingSink())
            mirror.sync()
            walks: list[float] = []
            again: list[float] = []
            primes: list[float] = []
            adopts: list[float] = []
            refreshes: list[float] = []
            extra = root / "extra"
            size = ""
            for r in range(rounds):
                order = (walk_start, primed_start) if r % 2 == 0 else (primed_start, walk_start)
                got = {f.__name__: f(db, n, kernel_map) for f in order}
                walks.append(got["walk_start"][0])
                primes.append(got["primed_start"][0])
                adopts.append(got["primed_start"][1])
                again.append(walk_start(db, n, kernel_map)[0])
                size = got["walk_start"][1]
                f = extra / f"new{r}"
                extra.mkdir(exist_ok=True)
                f.write_bytes(b"\x7fELF new %d" % r)
                db.add_entries("bench-extra", "dir", scan([str(f)], all_files=True))
                db.remove_paths([f"{root}/files/d0000/f{r:07d}"])
                t0 = time.perf_counter()
                st = mirror.refresh()
                refreshes.append(time.perf_counter() - t0)
                assert st is not None and st.paths == 2 and st.inserted == 1 and st.removed == 1, st
            db.close()
        wm, pm, am = (statistics.median(x) for x in (walks, primes, adopts))
        rm = statistics.median(refreshes)
        fap = f", x{FAPOLICYD_137K_S / pm:.0f} faster than fapolicyd's 54.7 s" if n == 137000 else ""
        print(f"  {n:>9,} entries (db built in {built:.1f} s{size}):\n"
              f"      start, walk first (baseline) {wm:7.3f} s ({wm / n * 1e6:4.1f} us/path)\n"
              f"      start on a primed map        {pm:7.3f} s  x{_median_ratio(primes, walks):.3f}"
              f" of the baseline{fap}\n"
              f"      adopt: read the pinned keys  {am:7.3f} s  x{_median_ratio(adopts, walks):.3f}"
              f"\n      refresh (+1 -1 entries)      {rm * 1e3:7.2f} ms  x{rm / wm:.5f}\n"
              f"      floor (walk vs walk again)   x{_median_ratio(again, walks):.3f}")


def walk_start(db: TrustDB, n: int, kernel_map: bool) -> tuple[float, str]:
    """(seconds, map size note) of a start that walks the database before the attach."""
    t0 = time.perf_counter()
    if not kernel_map:
        s = Mirror(db, CountingSink()).sync()
        took = time.perf_counter() - t0
        assert s.cached >= n - 3 and not s.skipped, s
        return took, ""
    kmap = KernelMap(n)
    try:
        s = Mirror(db, kmap.sink).sync()
        took = time.perf_counter() - t0
    finally:
        kmap.close()
    assert s.cached >= n - 3 and not s.skipped, s
    return took, f", map of {kmap.max_entries:,}"


def primed_start(db: TrustDB, n: int, kernel_map: bool) -> tuple[float, float]:
    """(seconds of a start on a primed map, seconds to read that map's keys back as the adopt
    road reads its pin)."""
    t0 = time.perf_counter()
    if not kernel_map:
        primed = Mirror(db, CountingSink()).prime()
        took = time.perf_counter() - t0
        assert primed >= n - 3, primed
        return took, 0.0
    kmap = KernelMap(n)
    try:
        primed = Mirror(db, kmap.sink).prime()
        took = time.perf_counter() - t0
        t1 = time.perf_counter()
        keys = kmap.sink.keys()  # as the service's adopt road reads its pin
        Mirror(db, CountingSink()).adopt(db.generation, keys)
        adopt = time.perf_counter() - t1
    finally:
        kmap.close()
    assert primed >= n - 3 and len(keys) == primed, (primed, len(keys))
    return took, adopt


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--files", type=int, default=3000)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--sizes", default="10000,137000,1000000")
    ap.add_argument("--kernel-map", action="store_true",
                    help="sync into a real BPF map (root), not a counting sink")
    ap.add_argument("--sizes-only", action="store_true")
    args = ap.parse_args()
    bench_sizes([int(x) for x in args.sizes.split(",") if x], args.rounds, args.kernel_map)
    if args.sizes_only:
        return
    cold: list[float] = []
    warm: list[float] = []
    total_bytes = 0
    with tempfile.TemporaryDirectory(prefix="trustdb-bench-") as tmp:
        for r in range(args.rounds):
            root = Path(tmp) / f"r{r}"
            (root / "db").mkdir(parents=True)
            entries = make_files(root, args.files)
            total_bytes = sum(e.size for e in entries)
            db = open_db(root, entries)
            time.sleep(0.1)  # past the ctime window in which the database will not cache
            c = timed_sync(db)
            w = timed_sync(db)
            assert c.hashed == args.files and w.cached == args.files and w.hashed == 0, (c, w)
            cold.append(c.elapsed)
            warm.append(w.elapsed)
            if r == 0:
                first, known = first_seen(root, db)
            db.close()
            shutil.rmtree(root)
    c_med, w_med = statistics.median(cold), statistics.median(warm)
    print(f"mirror of {args.files} files ({total_bytes / 1e6:.0f} MB), LMDB trust database")
    print(
        f"  cold (hash every file):     {c_med * 1e3:8.1f} ms  ({total_bytes / c_med / 1e9:.2f} GB/s)"
    )
    print(
        f"  warm (verification cache):  {w_med * 1e3:8.1f} ms  ({w_med / args.files * 1e6:.1f} us/file)"
    )
    print(f"  warm / cold = x{w_med / c_med:.3f}   (cold is x{c_med / w_med:.1f} the warm sync)")
    size = os.path.getsize(FIRST_SEEN_BINARY) / 1e6
    print(
        f"first-seen path (Mirror.verify_file), fresh copies of {FIRST_SEEN_BINARY} ({size:.1f} MB):"
    )
    print(f"  unknown key (hash, insert):  {first * 1e3:8.3f} ms per file")
    print(f"  known key (fast path):       {known * 1e6:8.1f} us per call")
    print(f"  known / unknown = x{known / first:.4f}")


if __name__ == "__main__":
    main()
