"""The enforcement suite with the `lsm` backend, run INSIDE a QEMU guest by tests/vm/test_lsm.py.

Not collected on the host (the file name does not start with test_): the host kernel refuses BPF
LSM. test_lsm.py boots a stock kernel with `bpf` in `lsm=` and runs
`python -m pytest tests/vm/guest_lsm.py` in it, with TD_VM_ARTIFACTS naming a directory of
binaries it built on the host (tdprobe, a variant of it with other content, libtdevil.so).

Each case runs confined (in a cgroup that is the backend's scope: EPERM expected) and, where it
matters, unconfined (must be unaffected). The trusted set is kept small on purpose (TCG makes
every exec cost ~20 ms): the test binaries' copies on the guest's tmpfs, sh, bash, cat, the
loader and the libraries they need, each added by its inode key as the mirror would. The last
tests run the product itself, `trustdb run --backend lsm`, against a real trust database.
"""

from __future__ import annotations

import ctypes
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.engine.route_cases import SELF_WRITTEN_CODE, case_id
from trustdb.abi import CEvent, Hook, Mode, ProgramFlag, Reason, Verdict
from trustdb.backends.interface import EngineConfig, Scope
from trustdb.backends.lsm import LsmBackend
from trustdb.libbpf import RingBuffer
from trustdb.model import InodeKey

ARTIFACTS = Path(os.environ.get("TD_VM_ARTIFACTS", "/nonexistent"))
WORK = Path("/tmp/td")
CGROUP_ROOT = Path("/sys/fs/cgroup")
LOADER = "/lib64/ld-linux-x86-64.so.2"
EPERM = f"errno={1}"
TRUSTED_PROGRAMS = [
    "/bin/sh",
    "/bin/bash",
    "/bin/cat",
    "/usr/bin/true",
    "/usr/bin/env",
    "/usr/bin/unshare",
    "/bin/dd",
]

pytestmark = pytest.mark.skipif(
    not (ARTIFACTS / "tdprobe").exists(), reason="runs inside the VM only (tests/vm/test_lsm.py)"
)


@dataclass
class Result:
    rc: int
    out: str
    err: str


class Engine:
    """The lsm backend loaded on a fresh cgroup scope, with a small trusted set."""

    def __init__(self, mode: Mode) -> None:
        self.cgroup = CGROUP_ROOT / f"td-{os.getpid()}-{int(mode)}"
        self.cgroup.mkdir()
        self.backend = LsmBackend()
        self.events: list[CEvent] = []
        self.ring: RingBuffer | None = None
        scope = Scope.for_cgroup(self.cgroup)
        self.backend.load(EngineConfig(mode=mode, scope=scope, supervisor_tgid=os.getpid()))

    def start(self) -> None:
        self.ring = RingBuffer(self.backend.events_fd, self._on_event)
        self.backend.attach()

    def _on_event(self, raw: bytes) -> None:
        self.events.append(CEvent.from_buffer_copy(raw[: ctypes.sizeof(CEvent)]))

    def trust(self, *paths: str | Path) -> None:
        keys = [InodeKey.from_stat(os.stat(p)) for p in paths]
        self.backend.trusted_inodes.add(keys)

    def drain(self) -> list[CEvent]:
        assert self.ring is not None
        self.ring.consume()
        out, self.events = self.events, []
        return out

    def run(self, *argv: str, env: dict[str, str] | None = None, confined: bool = True) -> Result:
        procs = str(self.cgroup / "cgroup.procs")

        def join() -> None:
            with open(procs, "w") as f:
                f.write("0")

        try:
            p = subprocess.run(
                list(argv),
                capture_output=True,
                text=True,
                env=dict(env or {}, PATH="/usr/bin:/bin", TD_MARKER=str(WORK / "evil-ran")),
                preexec_fn=join if confined else None,
                timeout=60,
                check=False,
            )
        except PermissionError as e:  # the exec itself was refused: the shell's 126
            return Result(126, "", f"{argv[0]}: {e.strerror}")
        return Result(p.returncode, p.stdout.strip(), p.stderr.strip())

    def close(self) -> None:
        if self.ring is not None:
            self.ring.close()
        self.backend.detach()
        _rmdir_when_empty(self.cgroup)


def _rmdir_when_empty(cgroup: Path) -> None:
    """Remove a cgroup whose tasks have exited (the kernel may take a moment to see it empty)."""
    for _ in range(100):
        try:
            cgroup.rmdir()
            return
        except OSError:
            time.sleep(0.05)
    cgroup.rmdir()  # still busy after 5 s: say so


def _libraries(*programs: str) -> set[str]:
    """What ld.so loads for `programs` (ldd), resolved to real files."""
    libs: set[str] = set()
    for prog in programs:
        out = subprocess.run(["ldd", prog], capture_output=True, text=True, check=True).stdout
        for line in out.splitlines():
            parts = line.split()
            path = parts[2] if "=>" in parts and len(parts) > 2 else parts[0]
            if path.startswith("/"):
                libs.add(os.path.realpath(path))
    return libs


@pytest.fixture(scope="module")
def files() -> Iterator[Path]:
    """The test binaries, copied onto the guest's tmpfs (exact inode keys, no 9p)."""
    if WORK.exists():
        shutil.rmtree(WORK)
    WORK.mkdir()
    for name in ("tdprobe", "untrusted", "libtdevil.so", "execstack", "interp-exec",
                 "interp-gap", "uses-interp-exec", "uses-interp-gap"):
        shutil.copy2(ARTIFACTS / name, WORK / name)
    (WORK / "script.sh").write_text("#!/bin/sh\necho script ran\n")
    (WORK / "trusted.sh").write_text("#!/bin/sh\necho trusted script ran\n")
    for s in ("script.sh", "trusted.sh"):
        (WORK / s).chmod(0o755)
    db = WORK / "db"
    db.mkdir()
    for name in ("data.mdb", "lock.mdb"):
        (db / name).write_bytes(b"\0" * 4096)
    yield WORK
    shutil.rmtree(WORK, ignore_errors=True)


@pytest.fixture(scope="module")
def engine(files: Path) -> Iterator[Engine]:
    eng = Engine(Mode.ENFORCE)
    try:
        real = [os.path.realpath(p) for p in TRUSTED_PROGRAMS]
        eng.trust(*real, *_libraries(*real, str(files / "tdprobe")))
        eng.trust(files / "tdprobe", files / "trusted.sh", files / "execstack")
        eng.trust(files / "uses-interp-exec", files / "uses-interp-gap")
        eng.backend.protect_database(files / "db")
        eng.start()
        yield eng
    finally:
        eng.close()


@pytest.fixture(autouse=True)
def _clean_marker(files: Path) -> None:
    (files / "evil-ran").unlink(missing_ok=True)


def _denied_paths(engine: Engine) -> list[str]:
    return [e.path.decode() for e in engine.drain() if e.verdict == Verdict.DENY]


def test_select_picks_lsm() -> None:
    from trustdb import backends

    chosen = backends.select()
    assert (chosen.name, chosen.refused) == ("lsm", ())


# ---- no false denials ---------------------------------------------------------------------


def test_trusted_program_runs(engine: Engine, files: Path) -> None:
    r = engine.run(str(files / "tdprobe"), "hello")
    assert (r.rc, r.out) == (0, "hello from trusted"), r


def test_bash_pipeline_runs(engine: Engine) -> None:
    r = engine.run("/bin/bash", "-c", "echo one two | cat | cat")
    assert (r.rc, r.out) == (0, "one two"), r


def test_trusted_script_runs(engine: Engine, files: Path) -> None:
    r = engine.run(str(files / "trusted.sh"))
    assert (r.rc, r.out) == (0, "trusted script ran"), r


def test_trusted_file_mprotect_allowed(engine: Engine, files: Path) -> None:
    assert engine.run(str(files / "tdprobe"), "mprotect", str(files / "tdprobe")).out == "ok"


def test_trusted_execveat_allowed(engine: Engine, files: Path) -> None:
    r = engine.run(str(files / "tdprobe"), "execveat", str(files / "tdprobe"))
    assert r.out == "hello from trusted", r


# ---- untrusted code gets EPERM -----------------------------------------------------------


def test_untrusted_exec_denied(engine: Engine, files: Path) -> None:
    engine.drain()
    r = engine.run(str(files / "untrusted"), "hello")
    assert r.rc != 0 and "Operation not permitted" in r.err, r
    events = engine.drain()
    denied = [e for e in events if e.verdict == Verdict.DENY]
    assert denied, "no decision event"
    e = denied[0]
    # the full path comes from bpf_d_path, and the event names this backend and hook
    assert (e.path.decode(), e.hook, e.backend, e.reason) == (
        str(files / "untrusted"),
        Hook.EXEC,
        2,
        Reason.UNTRUSTED,
    ), e.path
    assert engine.run(str(files / "untrusted"), "hello", confined=False).out == (
        "hello from untrusted"
    )


def test_loader_runs_untrusted_denied(engine: Engine, files: Path) -> None:
    r = engine.run(LOADER, str(files / "untrusted"), "hello")
    assert r.rc != 0 and "hello" not in r.out, r
    assert str(files / "untrusted") in _denied_paths(engine)
    r = engine.run(LOADER, str(files / "untrusted"), "hello", confined=False)
    assert r.out == "hello from untrusted"


def test_ld_preload_untrusted_never_runs(engine: Engine, files: Path) -> None:
    env = {"LD_PRELOAD": str(files / "libtdevil.so")}
    r = engine.run(str(files / "tdprobe"), "hello", env=env)
    # ld.so warns and runs the program without the library: its constructor must not run
    assert r.out == "hello from trusted" and "constructor ran" not in r.err, r
    assert not (files / "evil-ran").exists()
    r = engine.run(str(files / "tdprobe"), "hello", env=env, confined=False)
    assert (files / "evil-ran").exists(), "unconfined LD_PRELOAD should have run the library"


def test_dlopen_untrusted_denied(engine: Engine, files: Path) -> None:
    r = engine.run(str(files / "tdprobe"), "dlopen", str(files / "libtdevil.so"))
    assert r.rc == 1 and r.out != "ok", r
    assert not (files / "evil-ran").exists()
    r = engine.run(str(files / "tdprobe"), "dlopen", str(files / "libtdevil.so"), confined=False)
    assert r.out == "ok"


def test_memfd_exec_denied(engine: Engine, files: Path) -> None:
    # trusted content, but copied into a memfd: a new inode nobody vouched for
    r = engine.run(str(files / "tdprobe"), "memfd", str(files / "tdprobe"))
    assert r.out == EPERM, r
    assert any(p.startswith("/memfd:tdprobe") for p in _denied_paths(engine))
    r = engine.run(str(files / "tdprobe"), "memfd", str(files / "tdprobe"), confined=False)
    assert r.out == "hello from trusted"


@pytest.mark.parametrize("how", ["execveat", "procfd"])
def test_execveat_untrusted_denied(engine: Engine, files: Path, how: str) -> None:
    r = engine.run(str(files / "tdprobe"), how, str(files / "untrusted"))
    assert r.out == EPERM, r
    r = engine.run(str(files / "tdprobe"), how, str(files / "untrusted"), confined=False)
    assert r.out == "hello from untrusted"


def test_mmap_exec_untrusted_denied(engine: Engine, files: Path) -> None:
    assert engine.run(str(files / "tdprobe"), "mmap", str(files / "untrusted")).out == EPERM


def test_mprotect_exec_untrusted_denied(engine: Engine, files: Path) -> None:
    r = engine.run(str(files / "tdprobe"), "mprotect", str(files / "untrusted"))
    assert r.out == EPERM, r
    events = [e for e in engine.drain() if e.verdict == Verdict.DENY]
    assert events and events[-1].hook == Hook.MPROTECT
    r = engine.run(str(files / "tdprobe"), "mprotect", str(files / "untrusted"), confined=False)
    assert r.out == "ok"


def test_modified_after_trust_denied(engine: Engine, files: Path) -> None:
    victim = files / "victim"
    shutil.copy2(files / "tdprobe", victim)
    time.sleep(0.05)  # past the coarse ctime tick of 6.1/6.12 (the mirror waits the same way)
    engine.trust(victim)
    assert engine.run(str(victim), "hello").out == "hello from trusted"
    time.sleep(0.05)
    with open(victim, "ab") as f:
        f.write(b"\0")
    r = engine.run(str(victim), "hello")
    assert r.rc != 0 and "Operation not permitted" in r.err, r


def test_untrusted_script_with_trusted_interpreter_denied(engine: Engine, files: Path) -> None:
    # the tracepoint backend only sees /bin/sh here; bprm_check_security sees the script
    r = engine.run(str(files / "script.sh"))
    assert r.rc != 0 and "script ran" not in r.out, r
    assert str(files / "script.sh") in _denied_paths(engine)
    assert engine.run("/bin/sh", str(files / "script.sh")).out == "script ran"  # read, not exec


# ---- issue 8: route 2, the ELF interpreter wherever it lies ----------------------------------


@pytest.mark.parametrize("kind", ["interp-exec", "interp-gap"])
def test_untrusted_interpreter_anywhere_denied(engine: Engine, files: Path, kind: str) -> None:
    """PT_INTERP names an untrusted ET_EXEC interpreter (AT_BASE 0) or a static PIE with holes:
    the kernel's own mapping of it goes through mmap_file and is refused (the exec, past its
    point of no return, dies)."""
    prog = str(files / f"uses-{kind}")
    r = engine.run(prog)
    assert r.rc != 0 and "interpreter ran" not in r.out, r
    assert str(files / kind) in _denied_paths(engine)
    if kind == "interp-gap":  # 6.1 cannot start the ET_EXEC one at all; 6.12 can
        assert engine.run(prog, confined=False).out == "interpreter ran"


# ---- issue 8: route 3, writable and executable at once ---------------------------------------


@pytest.fixture
def lib(engine: Engine, files: Path) -> Iterator[Path]:
    """A trusted copy of a program, used as a library: mapped executable, written to."""
    path = files / "lib"
    shutil.copy2(files / "untrusted", path)
    time.sleep(0.05)  # past the coarse ctime tick of 6.1/6.12
    engine.trust(path)
    yield path
    path.unlink()


def test_exec_mapping_with_writer_open_denied(engine: Engine, files: Path, lib: Path) -> None:
    with open(lib, "r+b"):
        assert engine.run(str(files / "tdprobe"), "mmap", str(lib)).out == EPERM
        events = [e for e in engine.drain() if e.verdict == Verdict.DENY]
        assert events and events[-1].reason == Reason.WRITABLE
    assert engine.run(str(files / "tdprobe"), "mmap", str(lib)).out == "ok"


def test_exec_mapping_of_shared_writable_file_denied(
    engine: Engine, files: Path, lib: Path
) -> None:
    import mmap

    with open(lib, "r+b") as f:
        shared = mmap.mmap(f.fileno(), 4096, flags=mmap.MAP_SHARED)
    try:
        assert engine.run(str(files / "tdprobe"), "mmap", str(lib)).out == EPERM
    finally:
        shared.close()
    assert engine.run(str(files / "tdprobe"), "mmap", str(lib)).out == "ok"


@pytest.mark.parametrize("how", ["mapshared", "mprotectshared", "openw", "truncate"])
def test_write_to_trusted_file_denied(engine: Engine, files: Path, lib: Path, how: str) -> None:
    before = lib.read_bytes()
    r = engine.run(str(files / "tdprobe"), how, str(lib))
    assert r.out == EPERM, r
    assert lib.read_bytes() == before
    assert any(e.hook == Hook.WRITE and e.reason == Reason.WRITABLE for e in engine.drain())


def test_overwrite_of_mapped_library_denied(engine: Engine, files: Path) -> None:
    """dd conv=notrunc over a file a confined task mapped executable (whose key is no longer
    the trusted one, e.g. after a chmod): refused, the mapping process would run new bytes."""
    path = files / "mapped"
    shutil.copy2(files / "tdprobe", path)
    time.sleep(0.05)
    engine.trust(path)
    assert engine.run(str(files / "tdprobe"), "mmap", str(path)).out == "ok"
    time.sleep(0.05)
    path.chmod(0o700)  # a new ctime: no longer the trusted key, still the mapped inode
    before = path.read_bytes()
    r = engine.run("/bin/dd", f"if={files / 'untrusted'}", f"of={path}", "conv=notrunc")
    assert r.rc != 0 and "Operation not permitted" in r.err, r
    assert path.read_bytes() == before
    path.unlink()


def test_proc_pid_mem_write_denied(engine: Engine, files: Path) -> None:
    assert engine.run(str(files / "tdprobe"), "openw", "/proc/self/mem").out == EPERM
    assert engine.run("/bin/cat", "/proc/self/maps").rc == 0
    assert engine.run(str(files / "tdprobe"), "openw", "/proc/self/mem", confined=False).out == "ok"


# ---- issue 8: route 4, code the process writes itself ----------------------------------------


@pytest.mark.parametrize("argv", SELF_WRITTEN_CODE, ids=case_id)
def test_self_written_code_denied(engine: Engine, files: Path, argv: list[str]) -> None:
    probe = str(files / "tdprobe")
    args = [probe if a == "PROBE" else a for a in argv]
    r = engine.run(probe, *args)
    assert r.out == EPERM, r
    assert engine.run(probe, *args, confined=False).out == "ran 42"


def test_jit_flagged_program_may_write_code(engine: Engine, files: Path) -> None:
    key = InodeKey.from_stat(os.stat(files / "tdprobe"))
    engine.backend.set_program_flags([(key, ProgramFlag.JIT)])
    try:
        for how in ("rwx", "mprotect", "shared"):
            assert engine.run(str(files / "tdprobe"), "selfcode", how).out == "ran 42"
    finally:
        engine.backend.set_program_flags([(key, 0)])
    assert engine.run(str(files / "tdprobe"), "selfcode", "rwx").out == EPERM


def test_executable_stack_killed(engine: Engine, files: Path) -> None:
    r = engine.run(str(files / "execstack"), "hello")
    assert r.rc == -signal.SIGKILL and "hello" not in r.out, r
    events = [e for e in engine.drain() if e.verdict == Verdict.DENY]
    assert events and (events[-1].hook, events[-1].reason) == (Hook.EXEC, Reason.ANON_EXEC)
    assert engine.run(str(files / "execstack"), "hello", confined=False).out == (
        "hello from trusted"
    )


SHELLCODE_PY = """
import ctypes, mmap
m = mmap.mmap(-1, 4096, prot=mmap.PROT_READ | mmap.PROT_WRITE | mmap.PROT_EXEC)
m.write(bytes([0xb8, 0x2a, 0, 0, 0, 0xc3]))
print("ran", ctypes.CFUNCTYPE(ctypes.c_int)(ctypes.addressof(ctypes.c_char.from_buffer(m)))())
"""


def test_python_ctypes_shellcode_denied(engine: Engine) -> None:
    import sysconfig

    py = os.path.realpath(sys.executable)
    dynload = Path(sysconfig.get_config_var("DESTSHARED"))
    mods = [str(p) for p in dynload.glob("*.so")]
    engine.trust(py, *mods, *_libraries(py, *mods))
    r = engine.run(py, "-I", "-c", SHELLCODE_PY)
    assert r.rc != 0 and "ran" not in r.out and "PermissionError" in r.err, r
    assert engine.run(py, "-I", "-c", "import ctypes; print(1)").out == "1"


# ---- issue 10, section 3: interpreters load only trusted scripts ----------------------------


@pytest.fixture
def interpreters(engine: Engine) -> Iterator[None]:
    keys = [InodeKey.from_stat(os.stat(os.path.realpath(p))) for p in ("/bin/bash", "/bin/sh")]
    engine.backend.set_program_flags([(k, ProgramFlag.INTERPRETER) for k in keys])
    try:
        yield
    finally:
        engine.backend.set_program_flags([(k, 0) for k in keys])


def test_interpreter_opens_only_trusted_scripts(
    engine: Engine, files: Path, interpreters: None
) -> None:
    r = engine.run("/bin/bash", str(files / "script.sh"))
    assert r.rc != 0 and "script ran" not in r.out and "not permitted" in r.err, r
    events = [e for e in engine.drain() if e.verdict == Verdict.DENY]
    assert events and (events[-1].hook, events[-1].reason) == (
        Hook.SCRIPT,
        Reason.UNTRUSTED_SCRIPT,
    )
    assert engine.run("/bin/sh", str(files / "script.sh")).rc != 0
    assert engine.run("/bin/bash", str(files / "trusted.sh")).out == "trusted script ran"
    assert engine.run("/bin/bash", str(files / "script.sh"), confined=False).out == "script ran"


def test_interpreter_limits_are_what_the_docs_say(
    engine: Engine, files: Path, interpreters: None
) -> None:
    """Out of reach (bpf/lsm_script.bpf.h): inline code, stdin, files without a script name."""
    assert engine.run("/bin/bash", "-c", "echo inline").out == "inline"
    plain = files / "script-without-extension"
    shutil.copy2(files / "script.sh", plain)
    assert engine.run("/bin/bash", str(plain)).out == "script ran"
    r = engine.run("/bin/sh", "-c", f"/bin/cat {files / 'script.sh'} | /bin/bash")
    assert r.out == "script ran"
    plain.unlink()


# ---- no off switch -------------------------------------------------------------------------


def test_bpf_syscall_denied(engine: Engine, files: Path) -> None:
    assert engine.run(str(files / "tdprobe"), "bpf").out == EPERM
    assert engine.run(str(files / "tdprobe"), "bpf", confined=False).out == "ok"


def test_signal_to_supervisor_denied(engine: Engine, files: Path) -> None:
    got: list[int] = []
    engine.drain()
    old = signal.signal(signal.SIGUSR1, lambda s, f: got.append(s))
    try:
        for sig in (signal.SIGUSR1, signal.SIGSTOP, signal.SIGKILL):
            r = engine.run(str(files / "tdprobe"), "kill", str(os.getpid()), str(int(sig)))
            assert r.out == EPERM, (sig, r)
        time.sleep(0.1)
        assert not got
        tamper = [e for e in engine.drain() if e.hook == Hook.TAMPER]
        assert tamper and tamper[0].reason == Reason.SIGNAL_SUPERVISOR
    finally:
        signal.signal(signal.SIGUSR1, old)


def test_ptrace_of_unconfined_denied(engine: Engine, files: Path) -> None:
    assert engine.run(str(files / "tdprobe"), "ptrace", str(os.getpid())).out == EPERM


@pytest.mark.parametrize(
    "argv",
    [
        ["openw", "db/data.mdb"],
        ["truncate", "db/data.mdb"],
        ["unlink", "db/data.mdb"],
        ["rename", "db/data.mdb", "db/other"],
        ["unlink", "db/lock.mdb"],
        ["rename", "db", "moved"],
    ],
    ids=lambda a: "-".join(a[:2]),
)
def test_trust_database_protected(engine: Engine, files: Path, argv: list[str]) -> None:
    args = [str(files / a) if "/" in a or a in ("db", "moved") else a for a in argv]
    r = engine.run(str(files / "tdprobe"), *args)
    assert r.out == EPERM, r
    assert (files / "db" / "data.mdb").stat().st_size == 4096


def test_trust_database_readers_still_work(engine: Engine, files: Path) -> None:
    # LMDB readers open lock.mdb read-write: allowed; the data file read-only: allowed
    assert engine.run(str(files / "tdprobe"), "openw", str(files / "db" / "lock.mdb")).out == "ok"
    r = engine.run("/bin/cat", str(files / "db" / "data.mdb"))
    assert r.rc == 0, r


def test_cgroup_escape_denied(engine: Engine, files: Path) -> None:
    r = engine.run(str(files / "tdprobe"), "cgmove", str(CGROUP_ROOT / "cgroup.procs"))
    assert r.out == EPERM, r
    # a cgroup inside the scope is fine
    inner = engine.cgroup / "inner"
    inner.mkdir(exist_ok=True)
    try:
        r = engine.run(str(files / "tdprobe"), "cgmove", str(inner / "cgroup.procs"))
        assert r.out == "ok", r
    finally:
        _rmdir_when_empty(inner)


def test_new_cgroup_namespace_stays_confined(engine: Engine, files: Path) -> None:
    r = engine.run("/usr/bin/unshare", "-C", str(files / "untrusted"), "hello")
    assert r.rc != 0 and "hello" not in r.out, r


def test_module_load_denied(engine: Engine, files: Path) -> None:
    assert engine.run(str(files / "tdprobe"), "module").out == EPERM
    # unconfined root gets past the LSM and fails on the image itself (ENOEXEC = 8)
    assert engine.run(str(files / "tdprobe"), "module", confined=False).out != EPERM


def test_sysctl_write_denied(engine: Engine, files: Path) -> None:
    r = engine.run(str(files / "tdprobe"), "openw", "/proc/sys/kernel/core_pattern")
    assert r.out == EPERM, r


def test_grandchildren_confined(engine: Engine, files: Path) -> None:
    r = engine.run("/bin/sh", "-c", f"/bin/sh -c '{files}/untrusted hello'")
    assert r.rc != 0 and "hello" not in r.out, r


# ---- audit mode ------------------------------------------------------------------------------


def test_audit_mode_allows_and_logs(files: Path, engine: Engine) -> None:
    audit = Engine(Mode.AUDIT)
    try:
        audit.start()
        r = audit.run(str(files / "untrusted"), "hello")
        assert r.out == "hello from untrusted", r
        events = audit.drain()
        assert any(
            e.verdict == Verdict.AUDIT_DENY and e.path.decode() == str(files / "untrusted")
            for e in events
        )
    finally:
        audit.close()


# ---- the product, end to end: `trustdb run --backend lsm` ------------------------------------

TRUSTDB = str(Path(sys.executable).parent / "trustdb")


def _trustdb(*args: str, db: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [TRUSTDB, *args], capture_output=True, text=True, timeout=300, check=False,
        env=dict(os.environ, TRUSTDB_DB=str(db)),
        cwd=db.parent,  # run's $WORKDIR: the test files (the rest of /tmp is private to a run)
    )  # fmt: skip


@pytest.fixture(scope="module")
def trust_db(files: Path) -> Path:
    db = files / "trustdb"
    probe = str(files / "tdprobe")
    r = _trustdb("trust", "--db", str(db), probe, *_libraries(probe), db=db)
    assert r.returncode == 0, r.stderr
    return db


def test_trustdb_run_allows_trusted(files: Path, trust_db: Path) -> None:
    r = _trustdb("run", "--backend", "lsm", "--", str(files / "tdprobe"), "hello", db=trust_db)
    assert (r.returncode, r.stdout.strip()) == (0, "hello from trusted"), r.stderr


def test_trustdb_run_denies_untrusted_and_says_what(files: Path, trust_db: Path) -> None:
    r = _trustdb("run", "--backend", "lsm", "--", str(files / "untrusted"), "hello", db=trust_db)
    assert r.returncode != 0 and "hello" not in r.stdout, r
    assert str(files / "untrusted") in r.stderr, r.stderr


def test_trustdb_run_denies_bpf(files: Path, trust_db: Path) -> None:
    r = _trustdb("run", "--backend", "lsm", "--", str(files / "tdprobe"), "bpf", db=trust_db)
    assert r.stdout.strip() == EPERM, (r.stdout, r.stderr)


def test_trustdb_run_copy_of_trusted_binary_runs(files: Path, trust_db: Path) -> None:
    # a new inode nobody inserted: the fanotify prewarm re-hashes it before the LSM decides
    copy = files / "copy-of-tdprobe"
    shutil.copy2(files / "tdprobe", copy)
    r = _trustdb("run", "--backend", "lsm", "--", str(copy), "hello", db=trust_db)
    assert (r.returncode, r.stdout.strip()) == (0, "hello from trusted"), r.stderr


def test_trustdb_run_denial_line_reaches_the_tools_own_stderr(files: Path, trust_db: Path
                                                             ) -> None:
    """Issue 10 part 4 on lsm: an agent (here bash, with `cat` reading each tool's stderr
    pipe to EOF) sees the tool's own error (EPERM: the tool goes on) and the supervisor's line
    in the same pipe, for LD_PRELOAD and dlopen of an untrusted library and an untrusted
    exec. The line goes through the stderr copy the first-seen handler took at the library's
    open (trustdb.held_stderr), or is written while an exec waits in its refused open."""
    shells = [os.path.realpath(p) for p in ("/bin/bash", "/bin/cat")]
    r = _trustdb("trust", "--db", str(trust_db), *shells, *_libraries(*shells), db=trust_db)
    assert r.returncode == 0, r.stderr
    f, probe = files, files / "tdprobe"
    script = (f"echo preload; LD_PRELOAD={f}/libtdevil.so {probe} hello 2>&1 >/dev/null | cat;"
              f" echo dlopen; {probe} dlopen {f}/libtdevil.so 2>&1 >/dev/null | cat;"
              f" echo exec; {f}/untrusted hello 2>&1 >/dev/null | cat")
    r = _trustdb("run", "--backend", "lsm", "--", "/bin/bash", "-c", script, db=trust_db)
    _, preload, rest = r.stdout.partition("preload\n")
    preload, _, rest = rest.partition("dlopen\n")
    dlopen, _, execd = rest.partition("exec\n")
    for name, text, verb, path in (("preload", preload, "executable mapping", "libtdevil.so"),
                                   ("dlopen", dlopen, "executable mapping", "libtdevil.so"),
                                   ("exec", execd, "exec", "untrusted")):
        # The handler names the file as its own root sees it: the guest's initramfs runs us
        # chrooted (the mounts show under /newroot), a real system does not.
        line = next((ln for ln in text.splitlines() if ln.startswith(f"trustdb: denied {verb} ")),
                    "")
        assert line and f"{f}/{path} " in line, (name, r.stdout, r.stderr)
    assert "cannot be preloaded" in preload, preload  # ld.so's own words: the call failed
    assert not (files / "evil-ran").exists()
