"""`trustdb run -- /bin/true` end to end, against `unshare -fpm --mount-proc /bin/true` (the
namespaces alone), in alternating rounds of one run. Goal (issue 11): at most 0.25 s.

The database is built once in a temporary directory from the system's own executables and
libraries plus the Python and Perl standard libraries (--all-files), about 10k paths; its
verification cache is warm, as on any run after the first. Bytecode caching is on for the
timed commands (an installed trustdb has its .pyc files; this environment sets
PYTHONDONTWRITEBYTECODE, which would time the compiler instead).

Also printed: `python3 -c "import trustdb.cli"` (the interpreter and the CLI's imports, the
floor of any verb) and the phases of one run from its own profile-free timers.

    python3 bench/run_startup.py [--rounds N] [--db DIR]
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
TREES = ["/usr/bin", "/usr/sbin", "/usr/lib/x86_64-linux-gnu", "/usr/libexec"]
ALL_FILES_TREES = ["/usr/lib/python3", "/usr/lib/python3.11", "/usr/share/perl", "/usr/share/perl5"]


def env() -> dict[str, str]:
    e = dict(os.environ, PYTHONPATH=str(REPO))
    e.pop("PYTHONDONTWRITEBYTECODE", None)
    return e


def build_db(db: Path) -> None:
    trees = [t for t in TREES if os.path.isdir(t)]
    subprocess.run(
        [sys.executable, "-c", "from trustdb.cli import main; main()", "trust", *trees],
        env=dict(env(), TRUSTDB_DB=str(db)),
        check=False,
        capture_output=True,
    )
    extra = [t for t in ALL_FILES_TREES if os.path.isdir(t)]
    subprocess.run(
        [
            sys.executable,
            "-c",
            "from trustdb.cli import main; main()",
            "trust",
            "--all-files",
            *extra,
        ],
        env=dict(env(), TRUSTDB_DB=str(db)),
        check=False,
        capture_output=True,
    )


def timed(cmd: list[str], extra_env: dict[str, str] | None = None) -> float:
    started = time.perf_counter()
    r = subprocess.run(cmd, env=dict(env(), **(extra_env or {})), capture_output=True, check=False)
    elapsed = time.perf_counter() - started
    if r.returncode != 0:
        raise SystemExit(
            f"{' '.join(cmd[:4])}... failed ({r.returncode}): {r.stderr.decode()[-400:]}"
        )
    return elapsed


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rounds", type=int, default=9)
    ap.add_argument("--db", type=Path, help="an existing database (default: build one)")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory(prefix="td-bench-run-") as tmp:
        db = args.db or Path(tmp) / "db"
        if args.db is None:
            build_db(db)
        entries = subprocess.run(
            [sys.executable, "-c", "from trustdb.cli import main; main()", "status"],
            env=dict(env(), TRUSTDB_DB=str(db)),
            capture_output=True,
            text=True,
            check=False,
        ).stdout
        count = next(
            (ln.split()[-1] for ln in entries.splitlines() if ln.startswith("entries")), "?"
        )
        dbenv = {"TRUSTDB_DB": str(db)}
        cases = {
            "unshare -fpm --mount-proc /bin/true": (
                ["unshare", "-fpm", "--mount-proc", "/bin/true"],
                None,
            ),
            "python3 -c 'import trustdb.cli'": ([sys.executable, "-c", "import trustdb.cli"], None),
            "trustdb run -- /bin/true": (
                [
                    sys.executable,
                    "-c",
                    "from trustdb.cli import main; main()",
                    "run",
                    "--",
                    "/bin/true",
                ],
                dbenv,
            ),
        }
        for cmd, extra in cases.values():  # warm-up: page cache, .pyc files, verification cache
            timed(cmd, extra)
        times: dict[str, list[float]] = {name: [] for name in cases}
        for _ in range(args.rounds):
            for name, (cmd, extra) in cases.items():
                times[name].append(timed(cmd, extra))
    load = os.getloadavg()[0]
    base = statistics.median(times["unshare -fpm --mount-proc /bin/true"])
    print(
        f"trustdb run start-up: database of {count} entries, {args.rounds} alternating rounds, "
        f"load average {load:.2f} on {os.cpu_count()} CPUs"
    )
    for name, ts in times.items():
        med = statistics.median(ts)
        print(f"  {name:40s} median {med:.3f} s  (min {min(ts):.3f})  x{med / base:.1f} of unshare")
    run = statistics.median(times["trustdb run -- /bin/true"])
    print(f"goal <= 0.25 s: {'met' if run <= 0.25 else 'NOT met'} ({run:.3f} s)")


if __name__ == "__main__":
    main()
