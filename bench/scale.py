"""Scale: `trust`, `import deb`, `check`, `list` and `status` at 10k, 100k and 1M entries, wall
time and peak memory (max RSS of the command), in one run. Goal (issue 11): nothing grows faster
than linearly, so the time per entry (last column) stays flat as the database grows tenfold.

The files are tiny and distinct, 1000 per directory, under /var/tmp; the dpkg database for
`import deb` is synthetic (status, .list and .md5sums files for packages of 1000 files each)
and names the same files, so the import reads each file once for MD5 and BLAKE3 (and SHA-256).
`check` hashes a 1000-file directory against the database (its cost should not depend on the
database's size); `list` prints every entry as JSON; `status` counts the tables. Memory: peak
RSS (which counts the LMDB file pages a command touched) and peak anonymous RSS (sampled).

    python3 bench/scale.py [--sizes 10000,100000,1000000]
"""

from __future__ import annotations

import argparse
import hashlib
import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
PER_DIR = 1000


def make_tree(root: Path, n: int) -> list[str]:
    """n tiny executables with distinct content, PER_DIR per directory; -> their relative paths."""
    rel = []
    for i in range(n):
        d = root / f"usr/lib/d{i // PER_DIR:04d}"
        if i % PER_DIR == 0:
            d.mkdir(parents=True)
        p = f"usr/lib/d{i // PER_DIR:04d}/f{i:07d}"
        fd = os.open(root / p, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o755)
        os.write(fd, b"\x7fELF %d" % i)
        os.close(fd)
        rel.append(p)
    return rel


def make_dpkg(root: Path, rel: list[str]) -> Path:
    """A dpkg admindir whose packages name every file (1000 per package)."""
    admin = root / "var/lib/dpkg"
    info = admin / "info"
    info.mkdir(parents=True)
    status = []
    for start in range(0, len(rel), PER_DIR):
        name = f"pkg{start // PER_DIR:04d}"
        files = rel[start : start + PER_DIR]
        status.append(
            f"Package: {name}\nStatus: install ok installed\nArchitecture: amd64\n"
            f"Version: 1.0\nDescription: bench\n"
        )
        (info / f"{name}.list").write_text("".join(f"/{p}\n" for p in files))
        sums = []
        for p in files:
            sums.append(f"{hashlib.md5((root / p).read_bytes()).hexdigest()}  {p}\n")
        (info / f"{name}.md5sums").write_text("".join(sums))
    (admin / "status").write_text("\n".join(status))
    return admin


class AnonPeak:
    """The largest RssAnon (/proc/PID/status) seen while a process runs, sampled every 20 ms:
    peak RSS also counts the LMDB file pages a command touched, which the kernel can drop, so
    it cannot tell bounded memory from unbounded; anonymous memory can."""

    def __init__(self, pid: int) -> None:
        self.kib = 0
        self._path = f"/proc/{pid}/status"
        self._done = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()

    def _sample(self) -> None:
        while not self._done.wait(0.02):
            try:
                with open(self._path) as f:
                    for line in f:
                        if line.startswith("RssAnon:"):
                            self.kib = max(self.kib, int(line.split()[1]))
            except OSError:
                return

    def stop(self) -> int:
        self._done.set()
        self._thread.join()
        return self.kib // 1024


def run(args: list[str], db: Path) -> tuple[float, int, int]:
    """(wall seconds, peak RSS in MiB, peak anonymous RSS in MiB) of one trustdb command."""
    cmd = [sys.executable, "-c", "from trustdb.cli import main; main()", *args]
    env = dict(os.environ, PYTHONPATH=str(REPO), TRUSTDB_DB=str(db))
    env.pop("PYTHONDONTWRITEBYTECODE", None)
    started = time.perf_counter()
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    anon = AnonPeak(proc.pid)
    _pid, status, usage = os.wait4(proc.pid, 0)  # a zombie until then: its status stays readable
    wall = time.perf_counter() - started
    anon_mib = anon.stop()
    proc.returncode = os.waitstatus_to_exitcode(status)
    err = proc.stderr.read().decode() if proc.stderr else ""
    if proc.returncode not in (0, 3):
        raise SystemExit(f"trustdb {' '.join(args[:2])} failed ({proc.returncode}): {err[-300:]}")
    return wall, usage.ru_maxrss // 1024, anon_mib


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--sizes", default="10000,100000,1000000")
    args = ap.parse_args()
    sizes = [int(x) for x in args.sizes.split(",") if x]
    rows: list[tuple[int, str, float, int]] = []
    print(f"scale (load average {os.getloadavg()[0]:.2f} at the start, {os.cpu_count()} CPUs)")
    print(f"  {'entries':>9}  {'step':24} {'wall s':>8} {'peak MiB':>9} {'anon MiB':>9} "
          f"{'us/entry':>9}")
    for n in sizes:
        with tempfile.TemporaryDirectory(prefix="trustdb-bench-scale-", dir="/var/tmp") as tmp:
            root = Path(tmp) / "root"
            rel = make_tree(root, n)
            admin = make_dpkg(root, rel)
            time.sleep(0.1)
            tdb, ddb = Path(tmp) / "trust-db", Path(tmp) / "deb-db"
            steps = [
                ("trust", ["trust", str(root / "usr")], tdb),
                ("import deb", ["import", "deb", "--root", str(root), "--admindir", str(admin)],
                 ddb),
                ("import deb (unchanged)", ["import", "deb", "--root", str(root), "--admindir",
                                            str(admin)], ddb),
                ("check 1000 files", ["check", str(root / "usr/lib/d0000")], tdb),
                ("list", ["list", "--json"], tdb),
                ("status", ["status"], tdb),
            ]
            for name, cmd, db in steps:
                wall, rss, anon = run(cmd, db)
                rows.append((n, name, wall, rss))
                # As it goes: a 1M-entry run is long, and a partial table is still a result.
                print(f"  {n:>9,}  {name:24} {wall:8.2f} {rss:9d} {anon:9d} "
                      f"{wall / n * 1e6:9.1f}", flush=True)
            size = sum(f.stat().st_size for f in tdb.iterdir()) // (1 << 20)
            print(f"  {n:>9,}  (trust database on disk: {size} MiB; peak RSS counts the pages "
                  "of it a command touched)", flush=True)
    print(f"  load average at the end: {os.getloadavg()[0]:.2f}")
    by_step: dict[str, list[tuple[int, float]]] = {}
    for n, name, wall, _ in rows:
        by_step.setdefault(name, []).append((n, wall))
    print("  growth from the smallest to the largest size (x entries -> x time):")
    for name, pts in by_step.items():
        (n0, w0), (n1, w1) = pts[0], pts[-1]
        print(f"    {name:24} x{n1 / n0:.0f} entries -> x{w1 / w0:.1f} time")


if __name__ == "__main__":
    main()
