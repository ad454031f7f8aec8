"""The first-seen path of `trustdb run` (trustdb.first_seen, trustdb.first_seen_handler): a real
`trustdb run` on the tracepoint backend, real fanotify marks on the tree's own mounts.

Every case runs inside the cgroup and mount namespace one `trustdb run` creates; the handler
only ever marks that namespace's mounts and only answers DENY to tasks carrying the run's
confinement mark. What is attacked, and what must keep working:
- trusted content under another inode (copy, chmod, rename, link; a copied library loaded by
  ld.so and by ctypes.CDLL; a copy in the tree's own /dev/shm) runs: no false kill;
- untrusted content executed directly, and a `#!` script run as `./x.sh`, fails with EPERM
  and the line on the command's own stderr;
- an interpreter told to load an untrusted script file is refused the open;
- an exec outside the tree raises no event at all while a run is active;
- with the handler killed, untrusted code is still killed by the BPF programs (fail-closed).
"""

from __future__ import annotations

import ctypes.util
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import pytest

from tests.engine.test_run import TOOLS, TRUSTDB, _closure, trust_files, workdir_of
from trustdb import session, supervisor
from trustdb.abi import Mode
from trustdb.first_seen import Interpreters
from trustdb.model import InodeKey

pytestmark = [pytest.mark.root, pytest.mark.bpf]

EXTRA_TOOLS = ("chmod", "mv", "ln", "rm", "touch", "sleep", "python3", "dd")


@pytest.fixture(scope="module")
def db(tmp_path_factory: pytest.TempPathFactory) -> Path:
    if os.geteuid() != 0:
        pytest.fail("first-seen tests need root (CI runs as root)")
    d = tmp_path_factory.mktemp("first-seen") / "db"
    tools = [shutil.which(t) for t in (*TOOLS, *EXTRA_TOOLS)]
    trust_files(d, _closure([t for t in tools if t] + [sys.executable]))
    return d


@pytest.fixture
def env(tmp_path: Path) -> dict[str, str]:
    """The decision log and state files of each run in the test's own directory."""
    (tmp_path / "log").mkdir()
    return dict(os.environ, TRUSTDB_LOG=str(tmp_path / "log" / "decisions.jsonl"),
                TRUSTDB_RUN_DIR=str(tmp_path / "state"))


def run(db: Path, script: str, env: dict[str, str], shell: str = "bash",
        timeout: float = 120) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*TRUSTDB, "run", "--db", str(db), "--", shell, "-c", script],
                          env=env, check=False, capture_output=True, text=True, timeout=timeout,
                          cwd=workdir_of(env))


def untrusted_copy(src: str, dst: Path) -> Path:
    dst.write_bytes(Path(src).read_bytes() + b"\0untrusted")
    dst.chmod(0o755)
    return dst


# --- trusted content under new inodes runs -----------------------------------------------------


def test_chmod_rename_link_right_before_exec_never_kill(db: Path, env: dict[str, str],
                                                       tmp_path: Path) -> None:
    """ctime is in the key and the ignore marks survive chmod/rename/link: each is followed at
    once by an exec of the file, 3 x 100 times."""
    t = tmp_path / "t"
    shutil.copy2("/bin/true", t)
    script = f"""cd {tmp_path}; ./t; ok=0; bad=0
    for i in {{1..100}}; do
      chmod 700 t; if ./t; then ok=$((ok+1)); else bad=$((bad+1)); fi
      mv t t2; if ./t2; then ok=$((ok+1)); else bad=$((bad+1)); fi; mv t2 t
      ln t t3; if ./t; then ok=$((ok+1)); else bad=$((bad+1)); fi; rm t3
      chmod 755 t
    done; echo ok=$ok bad=$bad"""
    got = run(db, script, env)
    assert got.stdout.strip().splitlines()[-1] == "ok=300 bad=0", got.stderr[-2000:]


def test_metadata_change_right_before_exec_while_the_handler_is_busy(
        db: Path, env: dict[str, str], tmp_path: Path) -> None:
    """The same, with the handler kept busy hashing first-seen files, so that its answer to a
    chmod/rename/link (dropping ignore marks) comes late: an exec that skipped the handler on
    an ignore mark then met a stale key and was killed. A trusted file the tree can change is
    therefore never exec-ignored: each of its execs asks, and is verified under its new key."""
    t = tmp_path / "t"
    shutil.copy2("/bin/true", t)
    big = _libpython()
    script = f"""cd {tmp_path}; ./t
    for b in 1 2 3; do
      ( while [ ! -e stop ]; do rm -f busy$b; cp {big} busy$b; cat busy$b > /dev/null; done ) &
    done
    ok=0; bad=0
    for i in {{1..250}}; do
      chmod 700 t; if ./t; then ok=$((ok+1)); else bad=$((bad+1)); fi
      mv t t2; if ./t2; then ok=$((ok+1)); else bad=$((bad+1)); fi; mv t2 t
      chmod 755 t
    done; touch stop; wait; echo ok=$ok bad=$bad"""
    got = run(db, script, env, timeout=300)
    assert got.stdout.strip().splitlines()[-1] == "ok=500 bad=0", got.stderr[-2000:]


def test_chmod_from_outside_racing_execs_of_an_ignored_file(db: Path, env: dict[str, str]
                                                           ) -> None:
    """A trusted file on a read-only mount of the tree carries a full ignore mark (its opens
    and execs never ask). Outside the tree, a thread chmods it without pause (every chmod
    moves ctime, so the kernel map's key is stale each time) while the tree execs it 400
    times. Before, an exec that came between a chmod and the handler's flush of the marks was
    killed; now the BPF side takes the handler's ignore mark as vouching for the unmodified
    content, and every exec runs."""
    import threading

    repo = Path(__file__).resolve().parents[2]
    (repo / "build").mkdir(exist_ok=True)
    where = Path(tempfile.mkdtemp(prefix="vouch-", dir=repo / "build"))  # read-only inside
    try:
        t = where / "true"
        shutil.copy2("/bin/true", t)
        trust_files(db, {str(t)})
        stop = threading.Event()

        def chmod_storm() -> None:
            mode = 0o755
            while not stop.is_set():
                mode ^= 0o010
                os.chmod(t, mode)
                time.sleep(0.0002)

        thread = threading.Thread(target=chmod_storm)
        script = f"""{t}; ok=0; bad=0; touch {workdir_of(env)}/go
        for i in {{1..400}}; do if {t}; then ok=$((ok+1)); else bad=$((bad+1)); fi; done
        echo ok=$ok bad=$bad"""
        go = workdir_of(env) / "go"
        proc = subprocess.Popen([*TRUSTDB, "run", "--db", str(db), "--", "bash", "-c", script],
                                env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                text=True, cwd=workdir_of(env))
        deadline = time.monotonic() + 60
        while not go.exists() and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.01)
        thread.start()
        try:
            out, err = proc.communicate(timeout=240)
        finally:
            stop.set()
            thread.join()
        assert out.strip().splitlines()[-1] == "ok=400 bad=0", err[-2000:]
    finally:
        shutil.rmtree(where, ignore_errors=True)


def _libpython() -> str:
    """A large trusted file (this Python's shared library, else its executable)."""
    import sysconfig
    lib = Path(sysconfig.get_config_var("LIBDIR") or "/", sysconfig.get_config_var("LDLIBRARY") or "")
    return os.path.realpath(lib if lib.is_file() else sys.executable)


def test_copies_of_trusted_libraries_load(db: Path, env: dict[str, str], tmp_path: Path) -> None:
    """ld.so (LD_LIBRARY_PATH) and ctypes.CDLL open a copy whose inode the map never saw: the
    open's permission event inserts its key before the mmap is checked."""
    libdir = tmp_path / "lib"
    libdir.mkdir()
    libc = os.path.realpath("/lib/x86_64-linux-gnu/libc.so.6")
    shutil.copy(libc, libdir / "libc.so.6")
    libm = os.path.realpath(f"/lib/x86_64-linux-gnu/{ctypes.util.find_library('m')}")
    shutil.copy(libm, tmp_path / "libm-copy.so")
    evil = untrusted_copy(libm, tmp_path / "libm-evil.so")
    py = sys.executable
    script = (f"LD_LIBRARY_PATH={libdir} /bin/true; echo ldso=$?; "
              f"{py} -c 'import ctypes; ctypes.CDLL(\"{tmp_path}/libm-copy.so\"); print(1)'; "
              f"echo cdll=$?; {py} -c 'import ctypes; ctypes.CDLL(\"{evil}\")'; echo evil=$?")
    got = run(db, script, env)
    assert "ldso=0\n1\ncdll=0\n" in got.stdout, got.stderr[-2000:]
    assert "evil=137" in got.stdout  # mapped executable: the BPF mmap check kills it


def test_copy_in_the_trees_dev_shm_runs(db: Path, env: dict[str, str]) -> None:
    got = run(db, "cp /bin/true /dev/shm/t && /dev/shm/t; echo shm=$?", env)
    assert got.stdout == "shm=0\n", got.stderr


# --- untrusted content: EPERM, and a line the command itself reads -----------------------------


def test_untrusted_exec_and_script_get_eperm_and_a_line(db: Path, env: dict[str, str],
                                                       tmp_path: Path) -> None:
    evil = untrusted_copy("/bin/true", tmp_path / "evil")
    script = tmp_path / "evil.sh"
    script.write_text("#!/bin/sh\necho ran\n")
    script.chmod(0o755)
    got = run(db, f"{evil} 2>{tmp_path}/err1; echo rc=$?; {script} 2>{tmp_path}/err2; "
                  "echo sh=$?", env)
    assert got.stdout == "rc=126\nsh=126\n", got.stderr  # EPERM, not SIGKILL (137)
    for name, path in (("err1", evil), ("err2", script)):
        text = (tmp_path / name).read_text()  # what the agent reading the command sees
        assert f"trustdb: denied exec of {path}" in text, text
        assert f"trustdb trust --db {db} {path}" in text
    assert f"denied exec of {evil}" in got.stderr  # and the supervisor's stderr
    log = [json.loads(x) for x in Path(env["TRUSTDB_LOG"]).read_text().splitlines()]
    assert any(e["path"] == str(script) and e["verdict"] == "deny" for e in log), log


def test_bpf_kill_line_reaches_the_commands_stderr(db: Path, env: dict[str, str],
                                                  tmp_path: Path) -> None:
    """An untrusted library mapped executable is killed by the BPF mmap check (no permission
    event can refuse an mmap): the line still reaches the stderr the command's caller reads,
    through the killed task's live parent (best effort: see README)."""
    libm = os.path.realpath(f"/lib/x86_64-linux-gnu/{ctypes.util.find_library('m')}")
    evil = untrusted_copy(libm, tmp_path / "libevil.so")
    # The parent lives on a moment (as a caller's shell does): the line is written after the
    # kill, when the supervisor reads the kernel's event, so a holder must still exist.
    got = run(db, f"( {sys.executable} -c 'import ctypes; ctypes.CDLL(\"{evil}\")'; "
                  f"echo rc=$?; sleep 1 ) 2>{tmp_path}/err", env)
    assert got.stdout == "rc=137\n", got.stderr
    text = (tmp_path / "err").read_text()
    assert f"denied executable mapping of {evil}" in text, (text, got.stderr)
    assert f"trustdb trust --db {db} {evil}" in text


OPENAT2 = """
import ctypes, os, struct, sys
how = struct.pack("=QQQ", os.O_RDWR, 0, 0)
libc = ctypes.CDLL(None, use_errno=True)
fd = libc.syscall(437, -100, sys.argv[1].encode(), how, len(how))
print("openat2", {1: "EPERM", 38: "ENOSYS"}.get(ctypes.get_errno()) if fd < 0 else fd)
"""


def test_trusted_file_cannot_be_opened_for_write(db: Path, env: dict[str, str],
                                                tmp_path: Path) -> None:
    """Route 3 (tracepoint side): a trusted binary in the tree's workdir is rewritten in place
    (O_TRUNC, dd conv=notrunc): each write open fails with EPERM (openat2, whose flags live in
    memory, gets ENOSYS), a read open works, and the file still runs as itself."""
    t = tmp_path / "t"
    shutil.copy2("/bin/true", t)
    probe = tmp_path / "openat2.py"
    probe.write_text(OPENAT2)
    trust_files(db, [str(probe)], label="openat2-probe")  # a trusted script, run by python
    script = (f"cd {tmp_path}; ./t; echo run=$?; cat /bin/false > t; echo trunc=$?; "
              f"dd if=/bin/false of=t conv=notrunc status=none; echo dd=$?; "
              f"{sys.executable} {probe} t; cat t > /dev/null; echo read=$?; ./t; echo again=$?")
    got = run(db, script, env)
    assert got.stdout == ("run=0\ntrunc=1\ndd=1\nopenat2 ENOSYS\nread=0\nagain=0\n"), got.stderr
    assert t.read_bytes() == Path("/bin/true").read_bytes()
    assert f"denied write open of {t}" in got.stderr


def test_interpreter_refused_an_untrusted_script(db: Path, tmp_path: Path) -> None:
    """sh (dash) is an interpreter; `sh evil.sh` opens evil.sh with a plain open, denied; a
    trusted script runs."""
    good = tmp_path / "good.sh"
    good.write_text("echo good\n")
    evil = tmp_path / "evil.sh"
    evil.write_text("echo evil\n")
    trust_files(db, [str(good)], label="scripts")
    dash = InodeKey.from_stat(os.stat("/bin/sh"))
    out = tmp_path / "out"

    def factory(config, dbp, backend, consume):  # type: ignore[no-untyped-def]
        return session.EngineSession(config, dbp, backend, consume,
                                     interpreters=Interpreters(keys={dash}))

    argv = ["/bin/bash", "-c", (f"/bin/sh {good} >{out}; echo good=$? >>{out}; "
                                f"/bin/sh {evil} >>{out} 2>&1; echo evil=$? >>{out}")]
    rc = supervisor.run(supervisor.RunOptions(argv=argv, db=db, workdir=str(tmp_path)),
                        engine_factory=factory)
    text = out.read_text()
    assert rc == 0 and "good\ngood=0\n" in text, text
    assert "echo evil" not in text and "evil\n" not in text.replace("evil.sh", "")
    assert "Operation not permitted" in text and "evil=2" in text, text


# --- scope, cost and fail-closed ---------------------------------------------------------------


def test_outside_the_tree_raises_no_event_and_handler_death_fails_closed(
        db: Path, tmp_path: Path) -> None:
    """While a run is active: execs and opens on the host raise no event (the marks are on
    the tree's mounts only, which the handler's fdinfo shows); then the handler is killed: the
    supervisor forgets its group in the BPF map and stops the tree with a one-line error (with
    no handler nothing judges scripts), and an untrusted exec the tree may still reach first is
    killed by the BPF programs: it never runs."""
    evil = untrusted_copy("/bin/true", tmp_path / "evil")
    go = tmp_path / "go"
    out = tmp_path / "out"
    sessions: list[session.EngineSession] = []
    seen: dict[str, object] = {}

    def factory(config, dbp, backend, consume):  # type: ignore[no-untyped-def]
        s = session.EngineSession(config, dbp, backend, consume)
        sessions.append(s)
        return s

    def outside() -> None:
        try:
            deadline = time.monotonic() + 60
            while not (sessions and sessions[0]._engine.first_seen):
                if time.monotonic() > deadline:
                    return
                time.sleep(0.05)
            handler = sessions[0]._engine.first_seen
            assert handler is not None
            time.sleep(0.5)
            before = handler.stats()
            for _ in range(20):
                subprocess.run(["/bin/true"], check=True)
                Path("/etc/hostname").read_bytes()
            shutil.copy("/bin/true", tmp_path / "host-copy")
            subprocess.run([str(tmp_path / "host-copy")], check=True)
            after = handler.stats()
            seen["delta"] = after["events"] - before["events"]
            seen["mounts"] = _marked_mount_ids(handler.pid)
            os.kill(handler.pid, signal.SIGKILL)
            time.sleep(0.2)
        finally:
            go.write_text("go")

    t = threading.Thread(target=outside)
    t.start()
    argv = ["/bin/bash", "-c", (f"while [ ! -e {go} ]; do sleep 0.1; done; {evil}; "
                                f"echo rc=$? > {out}")]
    try:
        with pytest.raises(session.SupervisorError, match="first-seen handler died"):
            supervisor.run(supervisor.RunOptions(argv=argv, db=db, workdir=str(tmp_path)),
                           engine_factory=factory)
    finally:
        t.join()
    assert seen.get("delta") == 0, seen
    ours = {int(line.split()[0]) for line in Path("/proc/self/mountinfo").read_text().splitlines()}
    assert seen["mounts"] and not set(seen["mounts"]) & ours  # type: ignore[arg-type]
    # The tree is stopped first; if its exec came before that, the kernel killed it.
    assert not out.exists() or out.read_text() == "rc=137\n"


def _marked_mount_ids(pid: int) -> list[int]:
    ids = []
    for info in Path(f"/proc/{pid}/fdinfo").iterdir():
        try:
            text = info.read_text()
        except OSError:
            continue
        for line in text.splitlines():
            if line.startswith("fanotify mnt_id:"):
                ids.append(int(line.split()[1].split(":")[1], 16))
            elif line.startswith("fanotify sdev:"):
                raise AssertionError(f"a filesystem mark in a run: {line}")
    return ids


def test_audit_mode_allows_and_reports(db: Path, env: dict[str, str], tmp_path: Path) -> None:
    evil = untrusted_copy("/bin/true", tmp_path / "evil")
    p = subprocess.run([*TRUSTDB, "run", "--db", str(db), "--audit", "--", "bash", "-c",
                        f"{evil}; echo rc=$?"], env=env, check=False, capture_output=True,
                       text=True, timeout=120, cwd=tmp_path)
    assert p.stdout == "rc=0\n", p.stderr
    assert "would deny (audit) exec of" in p.stderr
    assert Mode.AUDIT  # the handler answers allow in audit mode


# --- Debian's own Python 3.11.2 (CPython gh-104372) --------------------------------------------

DEBIAN_PYTHON = Path("/usr/bin/python3")
VENV = Path(__file__).resolve().parents[2] / "build" / "debian-python-venv"


@pytest.fixture(scope="module")
def debian_python() -> Path:
    """A venv of /usr/bin/python3 with the project's dependencies from PyPI (made once, kept
    under build/). Debian 12's python3 is 3.11.2, the version gh-104372 deadlocked."""
    if not DEBIAN_PYTHON.exists():
        pytest.fail("/usr/bin/python3 missing (Debian's python3 is in every Debian install)")
    py = VENV / "bin" / "python"
    if not py.exists():
        import tomllib

        deps = tomllib.loads((VENV.parents[1] / "pyproject.toml").read_text())["project"][
            "dependencies"]
        subprocess.run([str(DEBIAN_PYTHON), "-m", "venv", str(VENV)], check=True)
        subprocess.run([str(py), "-m", "pip", "install", "-q", *deps], check=True)
    return py


def test_debian_python_runs_the_handler(debian_python: Path, db: Path, env: dict[str, str],
                                        tmp_path: Path) -> None:
    version = subprocess.run([str(debian_python), "-c", "import sys; print(sys.version_info[:3])"],
                             capture_output=True, text=True, check=True).stdout
    copy = tmp_path / "t"
    shutil.copy2("/bin/true", copy)
    evil = untrusted_copy("/bin/true", tmp_path / "evil")
    env = dict(env, PYTHONPATH=str(VENV.parents[1]))
    p = subprocess.run([str(debian_python), "-c", "from trustdb.cli import main; main()", "run",
                        "--db", str(db), "--", "bash", "-c",
                        (f"{copy}; echo copy=$?; chmod 700 {copy}; {copy}; echo chmod=$?; "
                         f"{evil}; echo evil=$?")],
                       env=env, capture_output=True, text=True, timeout=120, check=False,
                       cwd=tmp_path)
    assert p.stdout == "copy=0\nchmod=0\nevil=126\n", (version, p.stderr)
    probe = Path(__file__).with_name("gh104372_probe.py")
    p = subprocess.run([str(debian_python), str(probe), str(db), "30"], env=env,
                       capture_output=True, text=True, timeout=120, check=False)
    words = p.stdout.split()
    assert words[:2] == ["spawned", "30"], (version, p.stdout, p.stderr)
    assert int(words[3]) >= 30  # each spawned exec waited in a permission event: no deadlock


def test_repeated_execs_raise_no_events(db: Path, tmp_path: Path) -> None:
    """Only first-seen files pay: 300 execs of trusted programs inside a run raise a handful of
    permission events (each file's first open), not one per exec (the cost bench/exec.py times
    is then the BPF programs', not a userspace round trip's)."""
    stats: dict[str, int] = {}

    def factory(config, dbp, backend, consume):  # type: ignore[no-untyped-def]
        s = session.EngineSession(config, dbp, backend, consume)
        close = s.close

        def close_with_stats() -> None:
            handler = s._engine.first_seen
            if handler is not None:
                stats.update(handler.stats())
            close()

        s.close = close_with_stats  # type: ignore[method-assign]
        return s

    argv = ["/bin/bash", "-c", "for i in {1..300}; do /bin/true; done"]
    rc = supervisor.run(supervisor.RunOptions(argv=argv, db=db, workdir=str(tmp_path)),
                        engine_factory=factory)
    assert rc == 0
    assert 0 < stats["events"] < 30, stats
