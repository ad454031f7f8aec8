"""The first-seen handler's cost per interpreter open with a script plan: `trustdb run -- sh -c
'python3 ./zen.py' x10` (zen.py: a copy of the stdlib's this.py, trusted by content; python
opens ~60 stdlib files, each asked about once), this checkout against `--before CHECKOUT`
(e.g. main before the per-open script check: the plan is cached, the files it names are
resolved and the opener's syscall path is read at each open), in alternating rounds of one run.
A noise floor (this checkout timed twice per round) is printed beside the ratio, with the load.

    python3 bench/script_opens.py --before CHECKOUT [--rounds N] [--db DIR]
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import run_startup as rs

LOOP = "for i in 1 2 3 4 5 6 7 8 9 10; do /usr/bin/python3 ./zen.py >/dev/null; done"


def command(tree: Path, db: Path) -> list[str]:
    boot = ("import sys; sys.path.insert(0, sys.argv.pop(1)); sys.argv[0] = 'trustdb'; "
            "from trustdb.cli import main; main()")
    return [sys.executable, "-I", "-c", boot, str(tree), "run", "--db", str(db), "--", "sh",
            "-c", LOOP]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--db", type=Path)
    ap.add_argument("--before", type=Path, required=True)
    a = ap.parse_args()
    db = a.db
    if db is None:
        db = Path(tempfile.mkdtemp(prefix="td-bench-scripts-")) / "db"
        rs.build_db(db)
    shutil.copyfile("/usr/lib/python3.11/this.py", os.path.join(rs.WORKDIR, "zen.py"))
    times: dict[str, list[float]] = {"after": [], "after (again: noise floor)": [], "before": []}
    for _ in range(a.rounds):
        times["before"].append(rs.timed(command(a.before, db), name="before"))
        times["after"].append(rs.timed(command(rs.REPO, db), name="after"))
        times["after (again: noise floor)"].append(
            rs.timed(command(rs.REPO, db), name="after (again: noise floor)"))
    med = {k: statistics.median(v) for k, v in times.items()}
    cpu = {k: statistics.median(v) for k, v in rs.CPU.items()}
    print(f"load {os.getloadavg()[0]:.2f}, {a.rounds} rounds, medians:")
    for k in times:
        print(f"  {k}: {med[k]:.3f} s wall, {cpu[k]:.3f} CPU-s")
    print(f"after/before: x{med['after'] / med['before']:.2f} wall, "
          f"x{cpu['after'] / cpu['before']:.2f} CPU; noise floor "
          f"{abs(med['after (again: noise floor)'] / med['after'] - 1):.2f}")


if __name__ == "__main__":
    main()
