#!/usr/bin/env python3
"""Benchmark `trustdb trust` against b3sum, and adding files to a large database.

1. Hash the same file set (page cache warmed first) with `trustdb trust --all-files` into a
   fresh database, end to end (interpreter start-up and the LMDB commit included), and with
   `b3sum` (fed through xargs, as a shell user would: the named baseline). Rounds alternate;
   prints files, bytes, both wall times and CPU seconds, the throughput ratio trustdb/b3sum
   (goal >= 1.0, issue 11), the noise floor (two b3sum runs of one round against each other)
   and the load average. Done for the many small files of --root (default /usr/lib) and for a
   few large ones (--large-files files of --large-mb MiB each, created under /var/tmp).
   Each round also times both tools on an empty file set (their fixed start-up: Python and the
   database commit against one exec), and a second ratio is printed with that subtracted from
   both: the rate at which bytes are hashed, which is what decides large files.
   `--before CHECKOUT` (e.g. `git worktree add /tmp/before a9fe012`) times that tree's trust
   in the same rounds, for a before/after ratio.
2. Time `trustdb trust` of 5,000 new files into a database that already holds 137,000 entries,
   against the same 5,000 files into an empty database (ratio ~1 means no slowdown with size;
   fapolicyd 1.1.7 takes 57 s for this because of a quadratic duplicate check).

Timings are wall clock on a shared, noisy machine: compare the ratios, measured in one run.
"""

from __future__ import annotations

import argparse
import os
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import blake3

from trustdb.db import TrustDB
from trustdb.model import FileKind, TrustEntry
from trustdb.walk import walk


def trustdb_cmd() -> list[str]:
    """The installed entry point next to this interpreter (not a pyenv shim: no extra exec)."""
    beside = Path(sys.executable).parent / "trustdb"
    exe = str(beside) if beside.exists() else shutil.which("trustdb")
    return [exe] if exe else [sys.executable, "-c", "from trustdb.cli import main; main()"]


def timed(cmd: list[str], **kw: object) -> tuple[float, float]:
    """-> (wall seconds, CPU seconds of the command and its children)."""
    cpu = _children_cpu()
    start = time.perf_counter()
    subprocess.run(cmd, check=False, stdout=subprocess.DEVNULL, **kw)  # type: ignore[call-overload]
    return time.perf_counter() - start, _children_cpu() - cpu


def _children_cpu() -> float:
    ru = resource.getrusage(resource.RUSAGE_CHILDREN)
    return ru.ru_utime + ru.ru_stime


def file_set(root: str) -> tuple[list[str], int]:
    files = [f for f in walk([root]) if isinstance(f, str)]
    size = 0
    for f in files:
        try:
            size += os.lstat(f).st_size
        except OSError:
            pass
    return files, size


def b3sum_run(list_file: Path) -> tuple[float, float]:
    with open(list_file, "rb") as stdin:
        return timed(
            ["xargs", "-r", "-0", "b3sum", "--no-names"], stdin=stdin, stderr=subprocess.DEVNULL
        )


def trust_run(root: str, tmp: Path, tree: Path | None = None) -> tuple[float, float]:
    db = tmp / f"db-{time.monotonic_ns()}"
    env = dict(os.environ, TRUSTDB_DB=str(db))
    if tree is not None:
        env["PYTHONPATH"] = str(tree)
    seconds = timed(
        [*trustdb_cmd(), "trust", "--all-files", "--source", "bench", root],
        env=env,
        stderr=subprocess.DEVNULL,
        cwd="/",  # never import a checkout from the working directory
    )
    shutil.rmtree(db)
    return seconds


@dataclass
class Runs:
    wall: list[float] = field(default_factory=list)
    cpu: list[float] = field(default_factory=list)

    def add(self, run: tuple[float, float]) -> float:
        self.wall.append(run[0])
        self.cpu.append(run[1])
        return run[0]

    def line(self, name: str) -> str:
        return (
            f"{name:22s} median {statistics.median(self.wall):6.2f} s wall, "
            f"{statistics.median(self.cpu):5.2f} s CPU   runs {_fmt(self.wall)}"
        )


def bench_throughput(root: str, rounds: int, tmp: Path, before: Path | None) -> None:
    """Rounds alternate b3sum, trustdb, b3sum (the order flips every round); the ratio is
    trustdb's throughput over b3sum's (> 1: trustdb is faster). The two b3sum runs of a round
    give the noise floor: the median |ratio - 1| between identical runs."""
    files, size = file_set(root)
    list_file = tmp / "files.lst"
    list_file.write_bytes(b"\0".join(os.fsencode(f) for f in files))
    empty_list = tmp / "empty.lst"
    empty_list.write_bytes(b"")
    empty_dir = tmp / "empty-dir"
    empty_dir.mkdir(exist_ok=True)
    b3sum_run(list_file)  # warm the page cache
    trust_run(root, tmp)
    load_start = os.getloadavg()[0]
    b3, td, old, b3_fixed, td_fixed = Runs(), Runs(), Runs(), Runs(), Runs()
    ratios: list[float] = []
    noise: list[float] = []
    speedups: list[float] = []
    for r in range(rounds):
        if r % 2:
            t = td.add(trust_run(root, tmp))
            a, b = b3.add(b3sum_run(list_file)), b3.add(b3sum_run(list_file))
        else:
            a = b3.add(b3sum_run(list_file))
            t = td.add(trust_run(root, tmp))
            b = b3.add(b3sum_run(list_file))
        if before is not None:
            speedups.append(old.add(trust_run(root, tmp, before)) / t)
        td_fixed.add(trust_run(str(empty_dir), tmp))
        b3_fixed.add(b3sum_run(empty_list))
        ratios.append(((a + b) / 2) / t)
        noise.append(abs(a / b - 1))
    print(f"file set: {root}: {len(files)} files, {size / 2**20:.0f} MiB")
    print(b3.line("b3sum (xargs):"))
    print(td.line("trustdb trust --all:"))
    if before is not None:
        print(old.line(f"before ({before.name}):"))
    print(b3_fixed.line("b3sum, no files:"))
    print(td_fixed.line("trustdb, no files:"))
    med = statistics.median
    print(
        f"throughput ratio trustdb/b3sum: median {med(ratios):.2f} end to end (goal >= 1.0); "
        f"start-up subtracted: {_net(med(b3.wall), med(b3_fixed.wall), med(td.wall), med(td_fixed.wall))} "
        f"wall, {_net(med(b3.cpu), med(b3_fixed.cpu), med(td.cpu), med(td_fixed.cpu))} CPU; "
        f"CPU b3sum/trustdb {med(b3.cpu) / med(td.cpu):.2f}; noise floor {med(noise):.2f}; "
        f"load average {load_start:.2f} -> {os.getloadavg()[0]:.2f} on {os.cpu_count()} CPUs"
    )
    if speedups:
        print(
            f"before/after in the same rounds: x{statistics.median(speedups):.2f} (before's wall "
            f"over this tree's, > 1: faster), "
            f"CPU {statistics.median(old.cpu):.2f} -> {statistics.median(td.cpu):.2f} s"
        )


def _net(base: float, base_fixed: float, ours: float, ours_fixed: float) -> str:
    """b3sum's time over ours, each less its start-up; n/a when noise left nothing to divide."""
    if ours - ours_fixed <= 0.01 or base - base_fixed <= 0:
        return "n/a"
    return f"{(base - base_fixed) / (ours - ours_fixed):.2f}"


def _fmt(xs: list[float]) -> str:
    return " ".join(f"{x:.2f}" for x in xs)


def seed(db_path: Path, n: int) -> None:
    """A database holding `n` entries of one package-like source."""

    def entries() -> Iterator[TrustEntry]:
        for i in range(n):
            path = f"/usr/lib/pkg{i // 50}/file{i}"
            yield TrustEntry(path, blake3.blake3(path.encode()).digest(), 1000 + i, FileKind.ELF)

    with TrustDB.open(db_path, write=True) as db:
        db.replace_source("deb", "deb", entries())


def bench_growth(tmp: Path, existing: int, new: int, rounds: int) -> None:
    src = tmp / "new-files"
    src.mkdir()
    for i in range(new):
        f = src / f"tool{i:05d}"
        f.write_bytes(b"#!/bin/sh\necho %d\n" % i)
        f.chmod(0o755)
    big: list[float] = []
    empty: list[float] = []
    for r in range(rounds):
        for size, results in ((existing, big), (0, empty)):
            db = tmp / f"db-{size}-{r}"
            if size:
                seed(db, size)
            env = dict(os.environ, TRUSTDB_DB=str(db))
            results.append(timed([*trustdb_cmd(), "trust", str(src)], env=env)[0])
            shutil.rmtree(db, ignore_errors=True)
    print(
        f"trust {new} new files into a DB of {existing} entries: best {min(big):.2f} s  "
        f"runs {_fmt(big)}"
    )
    print(
        f"trust {new} new files into an empty DB:          best {min(empty):.2f} s  "
        f"runs {_fmt(empty)}"
    )
    print(f"slowdown from database size: {min(big) / min(empty):.2f}x  (fapolicyd 1.1.7: 57 s)")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--root", default="/usr/lib", help="tree to hash (default /usr/lib)")
    ap.add_argument("--large-files", type=int, default=3)
    ap.add_argument("--large-mb", type=int, default=150)
    ap.add_argument("--skip-growth", action="store_true")
    ap.add_argument("--rounds", type=int, default=4)
    ap.add_argument("--existing", type=int, default=137_000)
    ap.add_argument("--new", type=int, default=5_000)
    ap.add_argument("--before", type=Path, help="another checkout, timed in the same rounds")
    args = ap.parse_args()
    if shutil.which("b3sum") is None:
        sys.exit("bench/hash.py: b3sum is not installed (apt-get install b3sum)")
    with tempfile.TemporaryDirectory(prefix="trustdb-bench-") as tmp:
        bench_throughput(args.root, args.rounds, Path(tmp), args.before)
        with tempfile.TemporaryDirectory(prefix="trustdb-bench-large-", dir="/var/tmp") as big:
            for i in range(args.large_files):
                with open(Path(big) / f"large{i}", "wb") as f:
                    f.writelines(os.urandom(1 << 20) for _ in range(args.large_mb))
            bench_throughput(big, args.rounds, Path(tmp), args.before)
        if not args.skip_growth:
            bench_growth(Path(tmp), args.existing, args.new, args.rounds)


if __name__ == "__main__":
    main()
