"""`trustdb run -- /bin/true` end to end, against `unshare -fpm --mount-proc /bin/true` (the
namespaces alone), in alternating rounds of one run. Goal (issue 11): at most 0.25 s.

The database is built once in a temporary directory from the system's own executables and
libraries plus the Python and Perl standard libraries (--all-files), about 10k paths; its
verification cache is warm, as on any run after the first. Bytecode caching is on for the
timed commands (an installed trustdb has its .pyc files; this environment sets
PYTHONDONTWRITEBYTECODE, which would time the compiler instead).

Two ways to start it: as a pip console script does (not isolated: trustdb.isolation re-execs
it under `python -I` before the CLI's imports) and as the .deb/.rpm launcher does (`python3 -I`,
one start). `--before DIR` times another checkout (main before a change) in the same rounds.
Also printed: the interpreter with `from trustdb.cli import main` (the entry point's own cost)
and with the CLI's imports (`trustdb.cli.application`), a noise floor (the launcher case timed
twice per round), and the start-up phases `run` pays inside, timed in this process each round:
the pass over every path record that finds interpreters by recorded name, the mount plan, the
cover mounts applied in a throwaway mount namespace, and the kernel's load and verification of
tracepoint.bpf.o (loaded, never attached), plain and as `run` loads it (against the remembered
CO-RE targets of trustdb.corecache, which the warm-up's first run writes when it is missing).

    python3 bench/run_startup.py [--rounds N] [--db DIR] [--before CHECKOUT]
"""

from __future__ import annotations

import argparse
import atexit
import os
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
WORKDIR = tempfile.mkdtemp(prefix="td-bench-run-workdir-", dir="/var/tmp")
"""Where the timed commands start (see `timed`); empty, outside the private /tmp of a run."""
atexit.register(shutil.rmtree, WORKDIR, True)
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


CPU: dict[str, list[float]] = {}
"""CPU seconds (user + system, the command and all its children) per case: on a loaded shared
machine the wall time mostly measures the others, the CPU time much less so."""


def _children_cpu() -> float:
    ru = resource.getrusage(resource.RUSAGE_CHILDREN)
    return ru.ru_utime + ru.ru_stime


def timed(cmd: list[str], extra_env: dict[str, str] | None = None, name: str = "") -> float:
    cpu = _children_cpu()
    started = time.perf_counter()
    # cwd: `python -c` puts the working directory first on sys.path, so started in a checkout
    # it would import that checkout whatever PYTHONPATH says (a --before that timed itself);
    # the run's workdir is this directory too (a project directory, as for a user).
    r = subprocess.run(cmd, env=dict(env(), **(extra_env or {})), capture_output=True,
                       check=False, cwd=WORKDIR)
    elapsed = time.perf_counter() - started
    if name:
        CPU.setdefault(name, []).append(_children_cpu() - cpu)
    if r.returncode != 0:
        raise SystemExit(
            f"{' '.join(cmd[:4])}... failed ({r.returncode}): {r.stderr.decode()[-400:]}"
        )
    return elapsed


def run_cmd(isolated: bool) -> list[str]:
    """`trustdb run -- /bin/true` as a pip console script starts it (re-exec'd under -I by
    trustdb.isolation), or as the .deb/.rpm launcher does (`python3 -I`: one start)."""
    if isolated:
        boot = ("import sys; sys.path.insert(0, sys.argv.pop(1)); sys.argv[0] = 'trustdb'; "
                "from trustdb.cli import main; main()")
        return [sys.executable, "-I", "-c", boot, "{tree}", "run", "--", "/bin/true"]
    return [sys.executable, "-c", "from trustdb.cli import main; main()", "run", "--", "/bin/true"]


def _fork_timed(work: Callable[[], object]) -> float:
    """Seconds `work` takes in a forked child (which then exits: nothing it did outlives it)."""
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:
        os.close(r)
        code = 0
        try:
            started = time.perf_counter()
            work()
            os.write(w, repr(time.perf_counter() - started).encode())
        except BaseException as e:  # noqa: BLE001  reported by the parent
            os.write(w, f"!{type(e).__name__}: {e}".encode())
            code = 1
        os._exit(code)
    os.close(w)
    out = os.read(r, 4096).decode()
    os.close(r)
    os.waitpid(pid, 0)
    if out.startswith("!"):
        raise SystemExit(f"bench: phase failed: {out[1:]}")
    return float(out)


def phases(db: Path, into: dict[str, list[float]]) -> int:
    """One round of `run`'s inner start-up phases (see the module docstring); -> covers."""
    sys.path.insert(0, str(REPO))
    from trustdb.backends.tracepoint import TracepointBackend
    from trustdb.confine.filesystem import plan_for
    from trustdb.confine.mounts import apply_mount_plan
    from trustdb.confine.programs import interpreter_names
    from trustdb.confine.syscalls import CLONE_NEWNS, unshare
    from trustdb.db import TrustDB
    from trustdb.libbpf import BpfObject
    from trustdb.policy import load as policies

    def clock(name: str, seconds: float) -> None:
        into.setdefault(name, []).append(seconds)

    policy = policies.load("agent")
    started = time.perf_counter()
    with TrustDB.open(db) as t:
        t.paths_named(interpreter_names(policy))  # type: ignore[arg-type]
    clock("interpreters by recorded name (one pass over the DB)", time.perf_counter() - started)
    started = time.perf_counter()
    fs = plan_for(policy, db, WORKDIR)
    clock("mount plan (plan_for)", time.perf_counter() - started)
    plan = fs.plan

    def mounts() -> None:
        unshare(CLONE_NEWNS)
        apply_mount_plan(plan)

    clock("cover mounts (apply_mount_plan, own namespace)", _fork_timed(mounts))

    def bpf_load() -> None:
        obj = BpfObject(TracepointBackend().object_path)
        obj.set_max_entries("trusted_inodes", 1 << 16)
        obj.load()
        obj.close()

    clock("tracepoint.bpf.o load + verify (not attached)", _fork_timed(bpf_load))

    def backend_load() -> None:  # as `run` loads it: against remembered CO-RE targets, if any
        from trustdb.abi import Mode
        from trustdb.backends.interface import EngineConfig, Scope

        backend = TracepointBackend()
        backend.load(EngineConfig(mode=Mode.AUDIT, scope=Scope(cgroup_id=1, cgroup_level=99),
                                  events_bytes=4096, max_entries=1 << 16))
        backend.detach()

    clock("the same, as run loads it (trustdb.corecache)", _fork_timed(backend_load))
    return len(plan.hidden) + len(plan.unlisted) + len(plan.private)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rounds", type=int, default=9)
    ap.add_argument("--db", type=Path, help="an existing database (default: build one)")
    ap.add_argument("--before", type=Path,
                    help="another checkout (e.g. main before a change), timed in the same rounds")
    args = ap.parse_args()
    trees = {"": REPO}
    if args.before is not None:
        trees[" [before]"] = args.before.resolve()
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
        base_name = "unshare -fpm --mount-proc /bin/true"
        cases: dict[str, tuple[list[str], dict[str, str] | None]] = {
            base_name: (["unshare", "-fpm", "--mount-proc", "/bin/true"], None),
        }
        for label, tree in trees.items():
            dbenv = {"TRUSTDB_DB": str(db), "PYTHONPATH": str(tree)}
            cases[f"python3 -c 'import trustdb.cli'{label}"] = (
                [sys.executable, "-c", "from trustdb.cli import main"], {"PYTHONPATH": str(tree)})
            cases[f"python3 -I: the CLI's imports{label}"] = (
                [sys.executable, "-I", "-c", f"import sys; sys.path.insert(0, {str(tree)!r}); "
                 "import trustdb.cli.application"], None)
            cases[f"trustdb run (console script){label}"] = (run_cmd(False), dbenv)
            launcher = [a.replace("{tree}", str(tree)) for a in run_cmd(True)]
            cases[f"trustdb run (-I launcher){label}"] = (launcher, dbenv)
        noise = "trustdb run (-I launcher), again"
        cases[noise] = cases["trustdb run (-I launcher)"]
        for cmd, extra in cases.values():  # warm-up: page cache, .pyc files, verification cache
            timed(cmd, extra)
        load_before = os.getloadavg()[0]
        times: dict[str, list[float]] = {name: [] for name in cases}
        inner: dict[str, list[float]] = {}
        covers = 0
        for _ in range(args.rounds):
            for name, (cmd, extra) in cases.items():
                times[name].append(timed(cmd, extra, name))
            covers = phases(db, inner)
    load = (load_before + os.getloadavg()[0]) / 2
    base = statistics.median(times[base_name])
    floor = statistics.median(
        abs(a / b - 1) for a, b in zip(times["trustdb run (-I launcher)"], times[noise]))
    print(
        f"trustdb run start-up: database of {count} entries, {args.rounds} alternating rounds, "
        f"load average {load:.2f} on {os.cpu_count()} CPUs; noise floor (the same command twice "
        f"per round, median |ratio - 1|) {floor:.2f}"
    )
    for name, ts in times.items():
        med = statistics.median(ts)
        cpu = statistics.median(CPU[name])
        print(f"  {name:48s} median {med:.3f} s  (min {min(ts):.3f})  x{med / base:.0f} of unshare"
              f"  CPU {cpu:.3f} s")
    print(f"  inside run (this tree, in-process; {covers} covered paths in the plan):")
    for name, ts in inner.items():
        print(f"    {name:54s} median {statistics.median(ts):.3f} s  (min {min(ts):.3f})")
    for label in trees:
        if label:
            for kind in ("console script", "-I launcher"):
                now = statistics.median(times[f"trustdb run ({kind})"])
                then = statistics.median(times[f"trustdb run ({kind}){label}"])
                cnow = statistics.median(CPU[f"trustdb run ({kind})"])
                cthen = statistics.median(CPU[f"trustdb run ({kind}){label}"])
                print(f"  {kind}: this tree / before = {now / then:.2f} wall, "
                      f"{cnow / cthen:.2f} CPU")
    run = statistics.median(times["trustdb run (-I launcher)"])
    print(f"goal <= 0.25 s: {'met' if run <= 0.25 else 'NOT met'} ({run:.3f} s, -I launcher)")


if __name__ == "__main__":
    main()
