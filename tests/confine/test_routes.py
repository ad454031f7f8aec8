"""Issue 8 routes closed on the `run` side: the clock, chroot, io_uring, the terminal, W^X and
/proc/PID/mem. Each attack runs unconfined first where that is safe for the shared host (so the
test proves the attempt is real), then inside `trustdb run` (tracepoint backend), where it must
fail with EPERM/EACCES/EROFS or be killed.
"""

from __future__ import annotations

import os
import pty
import select
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.engine import test_run as base
from tests.engine.test_run import TRUSTDB, run_confined, run_unconfined

pytestmark = [pytest.mark.root, pytest.mark.bpf]

trusted_db = base.trusted_db
run_env = base.run_env
untrusted = base.untrusted
no_leftovers = base.no_leftovers

PY = sys.executable


def _py(code: str) -> str:
    """A shell word running `code` with the trusted Python."""
    return f"{PY} -c '{code}'"


ERRNO = ("import ctypes, errno; l = ctypes.CDLL(None, use_errno=True); "
         "e = lambda r: \"ok\" if r >= 0 else errno.errorcode[ctypes.get_errno()]; ")


def test_clock_cannot_be_set_back(trusted_db: Path, run_env: dict[str, str],
                                  untrusted: Path, tmp_path: Path) -> None:
    """Route 4: set CLOCK_REALTIME back, rewrite a trusted file in place, run it. The clock
    calls fail with EPERM, CAP_SYS_TIME is in no set, and the rewritten file is killed.
    (Never tried unconfined: it would move the shared host's clock.)"""
    victim = tmp_path / "victim"
    shutil.copy2("/bin/true", victim)
    attack = _py(
        ERRNO + "import time; ts = (ctypes.c_long * 2)(int(time.time()) - 1, 0); "
        "tv = (ctypes.c_long * 2)(int(time.time()) - 1, 0); tx = (ctypes.c_char * 256)(); "
        "print(e(l.syscall(227, 0, ts)), e(l.syscall(164, tv, 0)), e(l.syscall(159, tx)), "
        "e(l.syscall(305, 0, tx)))")
    script = (f"{victim}; echo before=$?; {attack}; "
              "grep -E \"^Cap(Eff|Prm|Bnd)\" /proc/self/status; "
              f"cat {untrusted} > {victim}; {victim}; echo after=$?")
    got = run_confined(trusted_db, script, run_env)
    lines = got.out.splitlines()
    assert "before=0" in lines, got
    assert "EPERM EPERM EPERM EPERM" in lines, got
    for line in lines:
        if line.startswith("Cap"):
            assert not int(line.split()[1], 16) & (1 << 25), line  # CAP_SYS_TIME
    # The rewrite itself is refused now (a write open of trusted content, the first-seen
    # handler), so the victim still holds the trusted bytes and runs as itself.
    assert "after=0" in lines and "denied write open of" in got.err, got
    assert victim.read_bytes() == Path("/bin/true").read_bytes()


def test_chroot_denied(trusted_db: Path, run_env: dict[str, str]) -> None:
    """Route 2: a root of its own would supply its own ELF interpreter to every exec."""
    attack = _py("import os; os.chroot(\"/\"); print(\"chroot ok\")")
    assert run_unconfined(attack, run_env).out == "chroot ok\n"
    got = run_confined(trusted_db, f"{attack}; echo rc=$?", run_env)
    assert got.out == "rc=1\n" and "Operation not permitted" in got.err, got


def test_io_uring_denied(trusted_db: Path, run_env: dict[str, str]) -> None:
    """io_uring runs opens and writes from kernel workers, past every per-syscall rule."""
    attack = _py(ERRNO + "p = (ctypes.c_char * 120)(); print(e(l.syscall(425, 4, p)), "
                 "e(l.syscall(426, 0, 0, 0, 0, 0, 0)), e(l.syscall(427, 0, 0, 0, 0)))")
    outside = run_unconfined(attack, run_env).out.split()
    assert outside[0] in ("ok", "EPERM")  # EPERM: io_uring_disabled=2 on this host
    got = run_confined(trusted_db, attack, run_env)
    assert got.out.split() == ["EPERM", "EPERM", "EPERM"], got


def _tiocsti(fd: str) -> str:
    return _py(ERRNO + f"import termios; print(\"sti\", e(l.ioctl({fd}, termios.TIOCSTI, "
               "ctypes.c_char_p(b\"x\"))), e(l.ioctl(" + fd + ", 0x541C, ctypes.c_char_p(b\"\\x02\"))))")


def test_tiocsti_denied_and_terminal_relayed(trusted_db: Path, run_env: dict[str, str]) -> None:
    """Route 6: TIOCSTI would push keystrokes into the user's shell. Given a terminal, the
    tree gets its own session and a relayed pty; the ioctl fails with EPERM either way, and
    the user's terminal is not reachable by path (/dev/pts is a private instance)."""
    master, slave = pty.openpty()
    try:
        # Unconfined, as root, TIOCSTI on a terminal works (that is the attack).
        p = subprocess.run(["sh", "-c", _tiocsti("0")], check=False, stdin=slave, capture_output=True,
                           text=True, env=run_env, timeout=30)
        assert p.stdout.split()[:2] == ["sti", "ok"], p
        os.read(master, 100)  # the injected byte
        name = os.ttyname(slave)
        script = (f"{_tiocsti('0')}; {_tiocsti('1')}; test -t 0 && echo tty; "
                  f"ls {name} 2>/dev/null || echo no-user-tty; "
                  f"{PY} -c 'import os; print(\"sid\", os.getsid(0) == os.getpid())'")
        proc = subprocess.Popen([*TRUSTDB, "run", "--db", str(trusted_db), "--", "sh", "-c",
                                 script], stdin=slave, stdout=slave, stderr=subprocess.PIPE,
                                env=run_env)
        out = b""
        deadline = time.monotonic() + 60
        while proc.poll() is None and time.monotonic() < deadline:
            if select.select([master], [], [], 0.1)[0]:
                out += os.read(master, 4096)
        while select.select([master], [], [], 0.2)[0]:
            out += os.read(master, 4096)
        assert proc.wait(timeout=10) == 0, proc.stderr.read() if proc.stderr else ""
    finally:
        os.close(master)
        os.close(slave)
    text = out.decode().replace("\r", "")
    assert text.count("sti EPERM EPERM") == 2, text
    assert "tty\n" in text and "no-user-tty" in text, text


def test_tiocsti_denied_without_terminal(trusted_db: Path, run_env: dict[str, str]) -> None:
    """Without a terminal the tree has no controlling terminal at all (its own session)."""
    got = run_confined(trusted_db, f"{_tiocsti('0')}; cat /dev/tty; echo tty=$?", run_env)
    assert "sti EPERM EPERM" in got.out and "tty=1" in got.out, got


RWX = _py("import mmap, ctypes; m = mmap.mmap(-1, 4096, prot=7); "
          "m.write(bytes([0xb8, 42, 0, 0, 0, 0xc3])); "
          "a = ctypes.addressof(ctypes.c_char.from_buffer(m)); "
          "print(\"ran\", ctypes.CFUNCTYPE(ctypes.c_int)(a)())")
"""Route 5: anonymous RWX memory, shellcode written and called (`mov eax, 42; ret`)."""


def test_write_execute_memory_denied(trusted_db: Path, run_env: dict[str, str]) -> None:
    assert run_unconfined(RWX, run_env).out == "ran 42\n"
    got = run_confined(trusted_db, f"{RWX}; echo rc=$?", run_env)
    assert "ran 42" not in got.out, got
    assert "rc=1" in got.out and "Permission denied" in got.err, got  # mmap: EACCES (MDWE)


PROC_MEM = _py(
    "import ctypes, os; libc = ctypes.CDLL(None); a = ctypes.cast(libc.getpid, ctypes.c_void_p).value; "
    "f = os.open(\"/proc/self/mem\", os.O_RDWR); os.lseek(f, a, 0); os.write(f, os.pread(f, 1, a)); "
    "print(\"wrote\")")
"""Route 5: a forced write (FOLL_FORCE) over the process's own read-only libc text."""


def test_proc_self_mem_write_refused(trusted_db: Path, run_env: dict[str, str]) -> None:
    assert run_unconfined(PROC_MEM, run_env).out == "wrote\n"
    got = run_confined(trusted_db, f"{PROC_MEM}; echo rc=$?", run_env)
    assert "wrote" not in got.out and "rc=1" in got.out, got
    assert "Read-only file system" in got.err, got


def test_own_install_read_only(trusted_db: Path, run_env: dict[str, str]) -> None:
    """Route 7: a .pth file or a module written into site-packages, the stdlib or trustdb's
    own package would run at the next unconfined `trustdb` start. Read-only inside; and the
    supervisor itself runs isolated (python -I: no PYTHON* variables, no cwd on its path)."""
    import site

    import trustdb

    targets = [Path(site.getsitepackages()[0]) / "trustdb-evil.pth",
               Path(os.__file__).parent / "trustdb_evil.py",
               Path(trustdb.__file__).parent / "trustdb_evil.py"]
    script = "; ".join(f"echo 'import os' > {t}; echo rc=$?" for t in targets)
    probe = targets[0].with_name("trustdb-probe.pth")
    try:
        assert run_unconfined(f"echo > {probe}; echo rc=$?", run_env).out == "rc=0\n"
    finally:
        probe.unlink(missing_ok=True)
    got = run_confined(trusted_db, script, run_env)
    assert got.out.split() == ["rc=2"] * 3, got
    assert not any(t.exists() for t in targets)


def test_supervisor_runs_isolated(trusted_db: Path, run_env: dict[str, str]) -> None:
    proc = subprocess.Popen([*TRUSTDB, "run", "--db", str(trusted_db), "--", "sleep", "30"],
                            env=run_env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            cwd=base.workdir_of(run_env))
    try:
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            cmdline = Path(f"/proc/{proc.pid}/cmdline").read_bytes().split(b"\0")
            if b"-I" in cmdline:
                break
            time.sleep(0.05)
        assert b"-I" in cmdline, cmdline  # re-exec'd in place: same pid
    finally:
        proc.kill()
        proc.wait()


def test_allow_jit_only_for_the_named_program(trusted_db: Path, run_env: dict[str, str]) -> None:
    """--allow-jit names a trusted program: W^X (PR_SET_MDWE, per process tree) is off, and the
    kernel programs allow anonymous executable memory to that program alone (ProgramFlag.JIT,
    by its inode key). Python named: the shellcode runs. /bin/true named: Python is still
    refused by the BPF programs (tracepoint: killed, or EPERM)."""
    got = run_confined(trusted_db, f"{RWX}; echo rc=$?", run_env, "--allow-jit", PY)
    assert f"JITs allowed: {PY}" in got.err and "ran 42" in got.out, got
    got = run_confined(trusted_db, f"{RWX}; echo rc=$?", run_env, "--allow-jit", "/bin/true")
    assert "ran 42" not in got.out and "rc=0" not in got.out, got
