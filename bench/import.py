"""`trustdb import deb` of this machine's whole dpkg database: into a fresh database, then again
with nothing changed, in one run (the machine is shared and noisy: compare the ratios).

Baseline, for scale: fapolicyd 1.1.7 needed 54.7 s just to load a 137k-entry trust list at
startup on this machine (2.5k entries/s), before deciding anything. The first trustdb import
does more per entry (reads each executable file, checks dpkg's MD5, computes BLAKE3 and
SHA-256); the second is what a package-manager hook or a restart pays.

    python3 bench/import.py [--root DIR] [--admindir DIR] [--keep DIR] [--before CHECKOUT]

`--before CHECKOUT` (another tree, e.g. `git worktree add /tmp/before 8f9a4bc`) times that tree's
unchanged re-import on a copy of the same database in the same rounds, wall and CPU seconds.
Bytecode caching is on for the timed commands (as for an installed trustdb).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import blake3

FAPOLICYD_SECONDS = 54.7
FAPOLICYD_ENTRIES = 137_000


REPO = Path(__file__).resolve().parent.parent
CPU: dict[str, list[float]] = {}
"""CPU seconds (user + system) of the timed commands, by case: less load-bound than wall."""


def _children_cpu() -> float:
    ru = resource.getrusage(resource.RUSAGE_CHILDREN)
    return ru.ru_utime + ru.ru_stime


def run_import(
    db: Path, extra: list[str], tree: Path = REPO, case: str = ""
) -> tuple[float, dict[str, Any], int]:
    cmd = [sys.executable, "-c", "from trustdb.cli import main; main()"]
    cmd += ["import", "deb", "--db", str(db), "--json", *extra]
    env = dict(os.environ, PYTHONPATH=str(tree))
    env.pop("PYTHONDONTWRITEBYTECODE", None)
    cpu = _children_cpu()
    start = time.monotonic()
    # cwd "/": `python -c` puts the working directory first on sys.path, so run from a checkout
    # it would import that checkout, whatever PYTHONPATH says (a --before that timed itself).
    result = subprocess.run(cmd, capture_output=True, text=True, check=False, env=env, cwd="/")
    wall = time.monotonic() - start
    if case:
        CPU.setdefault(case, []).append(_children_cpu() - cpu)
    if result.returncode not in (0, 3):  # 3: imported, some files failed verification
        sys.exit(f"bench: import failed ({result.returncode}): {result.stderr.strip()}")
    (source,) = json.loads(result.stdout)["sources"]
    return wall, source, result.returncode


def hash_floor_seconds(nbytes: int) -> float:
    """Seconds the first import's hashing alone needs here: MD5 + SHA-256 + BLAKE3 of every
    byte read, measured on a 64 MiB buffer in this run, spread over every core."""
    buf = os.urandom(64 << 20)
    start = time.perf_counter()
    hashlib.md5(buf, usedforsecurity=False).digest()
    hashlib.sha256(buf).digest()
    blake3.blake3(buf, max_threads=1).digest()
    per_byte = (time.perf_counter() - start) / len(buf)
    return nbytes * per_byte / (os.cpu_count() or 1)


def hashed_files(db: Path) -> list[str]:
    """The files the import read in full: what it trusted (from `trustdb list --json`)."""
    cmd = [sys.executable, "-c", "from trustdb.cli import main; main()", "list", "--json"]
    out = subprocess.run([*cmd, "--db", str(db)], capture_output=True, text=True, check=True)
    return sorted({e["path"] for e in json.loads(out.stdout) if os.path.isfile(e["path"])})


def side_by_side(list_file: Path) -> float:
    """`xargs md5sum` and `xargs b3sum` over the same files, run at the same time (issue 11's
    baseline: what reading them for dpkg's MD5 and for BLAKE3 costs the tools built for it)."""
    start = time.monotonic()
    procs = [
        subprocess.Popen(
            ["xargs", "-0", tool], stdin=open(list_file, "rb"),  # noqa: SIM115
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )
        for tool in ("md5sum", "b3sum")
    ]
    for p in procs:
        p.wait()
    return time.monotonic() - start


def describe(name: str, wall: float, src: dict[str, Any]) -> None:
    st, w = src["stats"], src["write"]
    print(
        f"{name}: {wall:6.2f} s wall  {st['packages']} packages, {st['files']} files, "
        f"{st['recorded']} trusted ({st['bytes_recorded'] / 1e9:.2f} GB), "
        f"{st['bytes_hashed'] / 1e9:.2f} GB read, {st['cache_hits']} cache hits, "
        f"{st['skipped']} skipped ({st['fatal']} failed); "
        f"db +{w['added']} -{w['removed']} ={w['unchanged']}"
    )


def _fmt(xs: list[float]) -> str:
    return " ".join(f"{x:.2f}" for x in xs)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--root", help="dpkg root (default /)")
    ap.add_argument("--admindir", help="dpkg admin dir")
    ap.add_argument("--keep", type=Path, help="database directory to use and keep")
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--before", type=Path, help="another checkout, its unchanged re-import timed "
                    "in the same rounds")
    args = ap.parse_args()
    extra = []
    if args.root:
        extra += ["--root", args.root]
    if args.admindir:
        extra += ["--admindir", args.admindir]

    load_start = os.getloadavg()[0]
    with tempfile.TemporaryDirectory(prefix="trustdb-bench-") as tmp:
        db = args.keep or Path(tmp) / "db"
        first_wall, first, _ = run_import(db, extra)
        list_file = Path(tmp) / "files.lst"
        read_in_full = hashed_files(db)
        list_file.write_bytes(b"\0".join(os.fsencode(p) for p in read_in_full))
        # Alternating rounds: baseline, fresh import (a new database), baseline, unchanged.
        base, fresh, unchanged, before = [], [first_wall], [], []
        old_db = Path(tmp) / "before-db"
        if args.before is not None:
            shutil.copytree(db, old_db)
            run_import(old_db, extra, args.before.resolve())  # settles its own part records
        run_import(db, extra)
        for r in range(args.rounds):
            base.append(side_by_side(list_file))
            fresh.append(run_import(Path(tmp) / f"fresh{r}", extra)[0])
            base.append(side_by_side(list_file))
            for _ in range(3):  # short runs: three of each per round
                unchanged.append(run_import(db, extra, case="unchanged")[0])
                if args.before is not None:
                    before.append(run_import(old_db, extra, args.before.resolve(), "before")[0])
        second_wall, second, _ = run_import(db, extra, case="unchanged")
        unchanged.append(second_wall)

    describe("first import (fresh db)   ", first_wall, first)
    describe("second import (unchanged) ", second_wall, second)
    print(f"ratio second/first: {second_wall / first_wall:.3f}")
    base_rate = FAPOLICYD_ENTRIES / FAPOLICYD_SECONDS
    files = first["stats"]["files"]
    print(
        f"baseline fapolicyd 1.1.7: {FAPOLICYD_SECONDS} s to load {FAPOLICYD_ENTRIES} entries "
        f"({base_rate:,.0f}/s). trustdb, files examined per second: first "
        f"{files / first_wall:,.0f}/s ({files / first_wall / base_rate:.1f}x), unchanged "
        f"{files / second_wall:,.0f}/s ({files / second_wall / base_rate:.1f}x)"
    )
    floor = hash_floor_seconds(first["stats"]["bytes_hashed"])
    print(
        f"hashing floor for the first import on {os.cpu_count()} cores: {floor:.2f} s "
        f"(first import / floor: {first_wall / floor:.2f})"
    )
    noise = statistics.median(abs(a / b - 1) for a, b in zip(base[::2], base[1::2]))
    print(
        f"fresh import: median {statistics.median(fresh):.2f} s (runs {_fmt(fresh)}); md5sum + "
        f"b3sum side by side over the {len(read_in_full)} files it read: median "
        f"{statistics.median(base):.2f} s (runs {_fmt(base)}); ratio "
        f"{statistics.median(fresh) / statistics.median(base):.2f} (goal <= 1.5; noise floor "
        f"{noise:.2f})"
    )
    pairs = list(zip(unchanged[::2], unchanged[1::2]))
    same = statistics.median(abs(a / b - 1) for a, b in pairs) if pairs else 0.0
    print(
        f"unchanged re-import: median {statistics.median(unchanged):.2f} s wall, "
        f"{statistics.median(CPU['unchanged']):.2f} s CPU (runs {_fmt(unchanged)}; goal < 0.5 s; "
        f"noise floor, consecutive runs: {same:.2f}); load average {load_start:.2f} -> "
        f"{os.getloadavg()[0]:.2f} on {os.cpu_count()} CPUs"
    )
    if before:
        now, then = statistics.median(unchanged), statistics.median(before)
        cnow, cthen = statistics.median(CPU["unchanged"]), statistics.median(CPU["before"])
        print(
            f"unchanged re-import, {args.before} in the same rounds: median {then:.2f} s wall, "
            f"{cthen:.2f} s CPU; this tree / before = {now / then:.2f} wall, {cnow / cthen:.2f} CPU"
        )
    if second["write"]["added"] or second["write"]["removed"]:
        sys.exit("bench: the unchanged re-import wrote something")


if __name__ == "__main__":
    main()
