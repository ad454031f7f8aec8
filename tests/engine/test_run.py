"""`trustdb run`: exit status, trusted and untrusted commands, and cleanup on every exit path.

Real kernel, real BPF programs, as root. Every case runs confined and unconfined (unconfined
must be unaffected). Nothing is denied outside the cgroup each `trustdb run` creates, and every
test checks that cgroup, its processes and its BPF programs are gone afterwards.
"""

from __future__ import annotations

import ctypes.util
import importlib.util
import json
import os
import shutil
import signal
import subprocess
import sysconfig
import sys
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import pytest

from trustdb import confine
from trustdb.db import TrustDB
from trustdb.hashing import hash_file
from trustdb.model import TrustEntry

pytestmark = [pytest.mark.root, pytest.mark.bpf]

TRUSTDB = [sys.executable, "-c", "from trustdb.cli import main; main()"]
TOOLS = (
    "sh", "bash", "true", "false", "cat", "ls", "sleep", "id", "env", "cp", "echo", "kill",
    "unshare", "nsenter", "mount", "umount", "mknod", "stat", "grep", "bpftool", "timeout",
    "wc", "head", "tr",
)
"""Programs the confined test scripts use: trusted, with their libraries."""


def _closure(binaries: Sequence[str]) -> set[str]:
    """The binaries, the shared libraries `ldd` names for them, and every shared object of
    this Python (extension modules the trustdb CLI imports); with this Python, its stdlib."""
    prefix = Path(sys.executable).resolve().parent.parent
    objects = [*binaries, *(str(p) for p in prefix.rglob("*.so*") if p.is_file())]
    libbpf = ctypes.util.find_library("bpf")  # the CLI loads it through trustdb.libbpf
    if libbpf:
        objects += [str(p) for p in Path("/usr/lib/x86_64-linux-gnu").glob(f"{libbpf}*")]
    files = {os.path.realpath(b) for b in objects}
    out = subprocess.run(["ldd", *objects], check=False, capture_output=True, text=True).stdout
    files.update(os.path.realpath(t) for t in out.split() if t.startswith("/"))
    if sys.executable in binaries:
        files |= python_stdlib()
    return {f for f in files if os.path.isfile(f)}


def trust_files(db: Path, paths: Sequence[str] | set[str], label: str = "test") -> None:
    entries = []
    for f in sorted(paths):
        h = hash_file(f)
        entries.append(TrustEntry(path=f, digest=h.digests.blake3, size=h.digests.size,
                                  kind=h.digests.kind, inode=h.inode))
    with TrustDB.open(db, write=True) as t:
        t.add_entries(label, "file", entries)


@pytest.fixture(scope="session")
def trusted_db(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A trust database holding the test tools, their libraries and this Python."""
    if os.geteuid() != 0:
        pytest.fail("trustdb run tests need root (CI runs as root)")
    db = tmp_path_factory.mktemp("trusted") / "db"
    tools = [shutil.which(t) for t in TOOLS]
    missing = [t for t, p in zip(TOOLS, tools, strict=True) if p is None]
    if missing:
        pytest.fail(f"test tools missing: {missing} (packaging/install-deps.sh installs them)")
    trust_files(db, _closure([p for p in tools if p] + [sys.executable]))
    return db


def python_stdlib() -> set[str]:
    """This Python's standard library (without its tests and site-packages): the recorded
    name of this Python makes it an interpreter wherever it lives (pyenv's python3.11 too), so
    the modules it imports inside `run` must be trusted content."""
    top = Path(sysconfig.get_paths()["stdlib"])
    skip = {top / "test", top / "site-packages", top / "idlelib", top / "tkinter"}
    out = set()
    for root, dirs, files in os.walk(top):
        dirs[:] = [d for d in dirs if Path(root, d) not in skip]
        out.update(os.path.join(root, f) for f in files if f.endswith((".py", ".pyc", ".so")))
    site = top / "site-packages"
    out.update(str(p) for p in site.glob("*.pth"))  # site runs them, and their finders:
    out.update(str(p) for p in site.glob("*.py"))
    for name in ("lmdb", "blake3"):  # what the tests import inside a run
        spec = importlib.util.find_spec(name)
        if spec is not None and spec.origin:
            where = Path(spec.origin)
            files = where.parent.rglob("*") if where.name == "__init__.py" else [where]
            out.update(str(p) for p in files if p.is_file())
    return out


@pytest.fixture
def run_env(tmp_path: Path) -> dict[str, str]:
    """Decision log and engine state files in the test's own directory."""
    (tmp_path / "log").mkdir()
    return dict(os.environ, TRUSTDB_LOG=str(tmp_path / "log" / "decisions.jsonl"),
                TRUSTDB_RUN_DIR=str(tmp_path / "state"))


@pytest.fixture
def untrusted(tmp_path: Path) -> Path:
    """A copy of /bin/true with one byte appended: content the database has never seen."""
    p = tmp_path / "untrusted"
    p.write_bytes(Path("/bin/true").read_bytes() + b"\0untrusted")
    p.chmod(0o755)
    return p


@dataclass
class Outcome:
    code: int
    out: str
    err: str


def run_confined(db: Path, script: str, env: dict[str, str], *extra: str,
                 timeout: float = 60) -> Outcome:
    p = subprocess.run([*TRUSTDB, "run", "--db", str(db), *extra, "--", "sh", "-c", script],
                       env=env, check=False, capture_output=True, text=True, timeout=timeout,
                       cwd=workdir_of(env))
    return Outcome(p.returncode, p.stdout, p.stderr)


def workdir_of(env: dict[str, str]) -> Path:
    """The test's own directory (run_env put the log there): the confined command's $WORKDIR,
    so the files a test plants there are inside, and the rest of /tmp is not."""
    return Path(env["TRUSTDB_LOG"]).parents[1]


def run_unconfined(script: str, env: dict[str, str], timeout: float = 60) -> Outcome:
    p = subprocess.run(["sh", "-c", script], env=env, check=False, capture_output=True, text=True,
                       timeout=timeout)
    return Outcome(p.returncode, p.stdout, p.stderr)


def run_cgroups() -> set[str]:
    return {p.name for p in confine.cgroup2_root().glob(f"{confine.CGROUP_PREFIX}*")}


def progs_held_by(pid: int) -> set[int]:
    """Ids of the BPF programs whose fds `pid` holds (its fdinfo names them)."""
    ids = set()
    for info in Path(f"/proc/{pid}/fdinfo").iterdir():
        try:
            text = info.read_text()
        except OSError:  # closed meanwhile
            continue
        ids.update(int(line.split()[1]) for line in text.splitlines()
                   if line.startswith("prog_id:"))
    return ids


def prog_ids() -> set[int]:
    out = subprocess.run(["bpftool", "-j", "prog", "show"], capture_output=True, text=True,
                         check=True).stdout
    return {p["id"] for p in json.loads(out)}


@pytest.fixture(autouse=True)
def no_leftovers() -> Iterator[None]:
    """Every test: the run cgroups it made are gone at the end (the reaper may take a moment)."""
    before = run_cgroups()
    yield
    deadline = time.monotonic() + 10
    while (left := run_cgroups() - before) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not left, f"cgroups left behind: {left}"


# --- exit status and plain runs ----------------------------------------------------------------


@pytest.mark.parametrize("code", [0, 1, 7, 255])
def test_exit_status_is_the_commands(trusted_db: Path, run_env: dict[str, str],
                                     code: int) -> None:
    assert run_unconfined(f"exit {code}", run_env).code == code
    assert run_confined(trusted_db, f"exit {code}", run_env).code == code


def test_trusted_commands_run(trusted_db: Path, run_env: dict[str, str]) -> None:
    script = "id -u; echo hello | cat; ls /usr >/dev/null && echo listed; bash -c 'echo bash ok'"
    want = "0\nhello\nlisted\nbash ok\n"
    assert run_unconfined(script, run_env).out == want
    got = run_confined(trusted_db, script, run_env)
    assert (got.code, got.out) == (0, want), got.err
    assert "denied" not in got.err


def test_python_with_c_extensions_runs(trusted_db: Path, run_env: dict[str, str]) -> None:
    script = f"{sys.executable} -c 'import lmdb, blake3, ctypes, json; print(42)'"
    assert run_unconfined(script, run_env).out == "42\n"
    got = run_confined(trusted_db, script, run_env)
    assert (got.code, got.out) == (0, "42\n"), got.err


def test_untrusted_binary_denied_and_named(trusted_db: Path, run_env: dict[str, str],
                                          untrusted: Path) -> None:
    script = f"{untrusted}; echo rc=$?"
    assert run_unconfined(script, run_env).out == "rc=0\n"
    got = run_confined(trusted_db, script, run_env)
    assert got.code == 0
    assert got.out == "rc=126\n"  # EPERM from the first-seen handler (137 if it is gone)
    line = next(ln for ln in got.err.splitlines() if ln.startswith("trustdb: denied"))
    assert "denied exec of" in line and "untrusted" in line
    assert "pid " in line and "To trust it: trustdb trust" in line
    # The JSON-lines log is the record.
    log = Path(run_env["TRUSTDB_LOG"]).read_text().splitlines()
    assert any(json.loads(x)["verdict"] in ("deny", "DENY") for x in log), log


def test_untrusted_command_itself(trusted_db: Path, run_env: dict[str, str],
                                  untrusted: Path) -> None:
    p = subprocess.run([*TRUSTDB, "run", "--db", str(trusted_db), "--", str(untrusted)],
                       env=run_env, check=False, capture_output=True, text=True, timeout=60,
                       cwd=workdir_of(run_env))
    assert p.returncode == 126  # its exec failed with EPERM (the first-seen handler)
    assert "It is the command you asked to run" in p.stderr
    assert f"trustdb trust --db {trusted_db} {untrusted}" in p.stderr


def test_copy_of_trusted_binary_runs(trusted_db: Path, run_env: dict[str, str],
                                     tmp_path: Path) -> None:
    """Content is trusted, not the inode: a fresh copy and a chmod'ed copy both run."""
    copy = tmp_path / "true-copy"
    shutil.copy2(shutil.which("true") or "/bin/true", copy)
    script = f"{copy}; echo copy=$?; chmod 0700 {copy}; {copy}; echo chmod=$?"
    assert run_unconfined(script, run_env).out == "copy=0\nchmod=0\n"
    got = run_confined(trusted_db, script, run_env)
    assert got.out == "copy=0\nchmod=0\n", got.err


def test_audit_mode_reports_and_allows(trusted_db: Path, run_env: dict[str, str],
                                       untrusted: Path) -> None:
    got = run_confined(trusted_db, f"{untrusted}; echo rc=$?", run_env, "--audit")
    assert got.out == "rc=0\n", got.err
    assert "would deny (audit) exec of" in got.err


def test_missing_command(trusted_db: Path, run_env: dict[str, str]) -> None:
    p = subprocess.run([*TRUSTDB, "run", "--db", str(trusted_db), "--", "no-such-cmd-xyz"],
                       env=run_env, check=False, capture_output=True, text=True, timeout=60)
    assert p.returncode == 127
    assert p.stderr.strip() == "trustdb: error: no-such-cmd-xyz: command not found"


def test_unknown_backend_fails_cleanly(trusted_db: Path, run_env: dict[str, str]) -> None:
    """An engine that cannot load: one line, exit 7, the waiting child killed, cgroup gone."""
    got = run_confined(trusted_db, "echo must-not-run", run_env, "--backend", "nope")
    assert got.code == 7
    assert got.out == ""
    assert got.err.startswith("trustdb: error: unknown backend")


def test_no_database(tmp_path: Path, run_env: dict[str, str]) -> None:
    got = run_confined(tmp_path / "nodb", "true", run_env)
    assert got.code == 4 and "no trust database" in got.err


# --- the supervisor ending: whatever way, the tree and the programs go with it -----------------


def _start_long_run(db: Path, env: dict[str, str]) -> tuple[subprocess.Popen[str], Path, set[int]]:
    """A run whose tree is `sleep` under `sh`; returns it once its programs are attached."""
    proc = subprocess.Popen(
        [*TRUSTDB, "run", "--db", str(db), "--", "sh", "-c", "sleep 1000 & sleep 1000; wait"],
        env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        cgs = list(confine.cgroup2_root().glob(f"{confine.CGROUP_PREFIX}{proc.pid}-*"))
        if cgs and len((cgs[0] / "cgroup.procs").read_text().split()) >= 3:
            progs = progs_held_by(proc.pid)
            if progs:
                return proc, cgs[0], progs
        if proc.poll() is not None:
            pytest.fail(f"run ended early: {proc.communicate()}")
        time.sleep(0.05)
    proc.kill()
    pytest.fail("confined tree did not start")


def _assert_all_gone(cgroup: Path, pids: list[int], progs: set[int]) -> None:
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        alive = [p for p in pids if Path(f"/proc/{p}").exists()]
        if not alive and not cgroup.exists() and not (progs & prog_ids()):
            return
        time.sleep(0.05)
    pytest.fail(f"left behind: pids {alive}, cgroup {cgroup.exists()}, "
                f"programs {progs & prog_ids()}")


def test_supervisor_sigkill_kills_tree_and_programs(trusted_db: Path,
                                                     run_env: dict[str, str]) -> None:
    proc, cgroup, progs = _start_long_run(trusted_db, run_env)
    pids = [int(p) for p in (cgroup / "cgroup.procs").read_text().split()]
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait(timeout=10)
    _assert_all_gone(cgroup, pids, progs)


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_supervisor_signal_ends_tree(trusted_db: Path, run_env: dict[str, str],
                                     sig: signal.Signals) -> None:
    """`sleep` as its namespace's init ignores the forwarded signal: after the grace period
    the tree is killed, and the exit status says which signal ended it."""
    proc, cgroup, progs = _start_long_run(trusted_db, run_env)
    pids = [int(p) for p in (cgroup / "cgroup.procs").read_text().split()]
    proc.send_signal(sig)
    assert proc.wait(timeout=20) == 128 + sig
    _assert_all_gone(cgroup, pids, progs)


def test_signal_handled_by_command(trusted_db: Path, run_env: dict[str, str]) -> None:
    """A command that handles SIGTERM gets it, and its own exit status is returned."""
    proc = subprocess.Popen(
        [*TRUSTDB, "run", "--db", str(trusted_db), "--", "sh", "-c",
         "trap 'echo got-term; exit 9' TERM; echo ready; while :; do sleep 0.1; done"],
        env=run_env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    assert proc.stdout is not None
    assert proc.stdout.readline() == "ready\n"
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=20)
    assert proc.returncode == 9, err
    assert out == "got-term\n"


def test_stale_cgroup_swept(trusted_db: Path, run_env: dict[str, str]) -> None:
    """A run cgroup whose supervisor and reaper are both gone is removed by the next run."""
    pid = 1
    while Path(f"/proc/{pid}").exists():  # a pid nobody uses now
        pid += 7919
    stale = confine.cgroup2_root() / f"{confine.CGROUP_PREFIX}{pid}-deadbeef"
    stale.mkdir()
    try:
        assert run_confined(trusted_db, "true", run_env).code == 0
        assert not stale.exists()
    finally:
        if stale.exists():
            stale.rmdir()


def test_status_names_the_running_engine(trusted_db: Path, run_env: dict[str, str]) -> None:
    proc, cgroup, _ = _start_long_run(trusted_db, run_env)
    try:
        p = subprocess.run([*TRUSTDB, "status", "--json", "--db", str(trusted_db)], env=run_env,
                           check=False, capture_output=True, text=True, timeout=60)
        info = json.loads(p.stdout)
        (engine,) = [e for e in info["engines"] if e["pid"] == proc.pid]
        assert engine["kind"] == "run" and engine["mode"] == "enforce"
        assert engine["backend"] == "tracepoint" and engine["scope"] == str(cgroup)
    finally:
        proc.kill()
        proc.wait()


def test_daemon_rejects_unknown_mode(run_env: dict[str, str]) -> None:
    """(The daemon itself enforces system-wide: never started by the test suite.)"""
    p = subprocess.run([*TRUSTDB, "daemon", "--mode", "permissive"], env=run_env, check=False,
                       capture_output=True, text=True, timeout=60)
    assert p.returncode == 2
    assert p.stderr.strip() == "trustdb: error: --mode must be enforce or audit, not 'permissive'"


def test_backends_lists_tracepoint(run_env: dict[str, str]) -> None:
    p = subprocess.run([*TRUSTDB, "backends", "--json"], env=run_env, check=False, capture_output=True,
                       text=True, timeout=60)
    assert p.returncode == 0, p.stderr
    rows = {r["name"]: r for r in json.loads(p.stdout)}
    assert rows["tracepoint"]["ok"], rows
    assert sum(r["selected"] for r in rows.values()) == 1
