"""The tracepoint backend in the real kernel: every case confined (denied) and unconfined (runs).

Each test gets a fresh cgroup and an engine scoped to it (conftest.py); only processes that
enter that cgroup are ever judged. Test programs are compiled with gcc here; "trusted" means
their inode keys were put in the kernel map.
"""

from __future__ import annotations

import ctypes
import os
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.engine.conftest import CGROUP2, Confined, closure, make_engine
from trustdb.abi import BackendId, CEvent, Hook, Mode, Reason, Verdict
from trustdb.backends import names, select
from trustdb.backends.interface import BackendError, EngineConfig, Scope
from trustdb.engine import Engine
from trustdb.libbpf import RingBuffer, held_program_ids
from trustdb.model import InodeKey

pytestmark = [pytest.mark.root, pytest.mark.bpf]

KILLED = -signal.SIGKILL

EVIL_C = r"""
#include <fcntl.h>
#include <stdlib.h>
#include <unistd.h>
__attribute__((constructor)) static void evil(void)
{
    const char *m = getenv("TD_MARKER");
    if (m) close(open(m, O_CREAT | O_WRONLY, 0644));
}
int evil_symbol(void) { return 42; }
"""

HELLO_C = r"""
#include <stdio.h>
int main(void) { puts("hello"); return 0; }
"""

# One trusted helper with a mode per way of running code.
TOOL_C = r"""
#define _GNU_SOURCE
#include <dlfcn.h>
#include <fcntl.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <sys/syscall.h>
#include <unistd.h>
extern char **environ;
int main(int argc, char **argv)
{
    if (argc < 3) return 2;
    const char *mode = argv[1], *path = argv[2];
    char *args[] = { (char *)path, NULL };
    if (!strcmp(mode, "dlopen")) {
        void *h = dlopen(path, RTLD_NOW);
        printf("dlopen %s\n", h ? "ok" : dlerror());
        return h ? 0 : 1;
    }
    int fd = open(path, O_RDONLY | O_CLOEXEC);
    if (fd < 0) { perror("open"); return 1; }
    if (!strcmp(mode, "memfd")) {
        int m = memfd_create("td", MFD_CLOEXEC);
        char buf[65536]; ssize_t n;
        while ((n = read(fd, buf, sizeof buf)) > 0) write(m, buf, n);
        fexecve(m, args, environ);
        perror("fexecve"); return 1;
    }
    if (!strcmp(mode, "execveat")) {
        syscall(SYS_execveat, fd, "", args, environ, AT_EMPTY_PATH);
        perror("execveat"); return 1;
    }
    if (!strcmp(mode, "procfd")) {
        int f = open(path, O_RDONLY);
        char p[64]; snprintf(p, sizeof p, "/proc/self/fd/%d", f);
        execve(p, args, environ);
        perror("execve"); return 1;
    }
    if (!strcmp(mode, "mprotect")) {
        struct stat st; fstat(fd, &st);
        void *a = mmap(NULL, st.st_size, PROT_READ, MAP_PRIVATE, fd, 0);
        if (a == MAP_FAILED) { perror("mmap"); return 1; }
        if (mprotect(a, st.st_size, PROT_READ | PROT_EXEC)) { perror("mprotect"); return 1; }
        printf("mprotect ok\n");
        return 0;
    }
    if (!strcmp(mode, "bigmprotect")) {  /* 80 mappings, then the file, one mprotect */
        long pg = 4096; int n = 80;
        int self = open("/proc/self/exe", O_RDONLY);
        char *base = mmap(NULL, (n + 1) * pg, PROT_NONE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
        for (int i = 0; i < n; i++)  /* page 0 of this (trusted) program each time: no merging */
            mmap(base + i * pg, pg, PROT_READ, MAP_PRIVATE | MAP_FIXED, self, 0);
        mmap(base + n * pg, pg, PROT_READ, MAP_PRIVATE | MAP_FIXED, fd, 0);
        if (mprotect(base, (n + 1) * pg, PROT_READ | PROT_EXEC)) { perror("mprotect"); return 1; }
        printf("bigmprotect ok\n");
        return 0;
    }
    if (!strcmp(mode, "waitmmapx")) {  /* wait for argv[3] to exist, then map exec */
        while (access(argv[3], F_OK)) usleep(20000);
        mode = "mmapx";
    }
    if (!strcmp(mode, "mmapx")) {
        struct stat st; fstat(fd, &st);
        void *a = mmap(NULL, st.st_size, PROT_READ | PROT_EXEC, MAP_PRIVATE, fd, 0);
        printf("mmapx %s\n", a == MAP_FAILED ? "failed" : "ok");
        return 0;
    }
    return 2;
}
"""


def _gcc(src: str, out: Path, *flags: str) -> Path:
    c = out.with_suffix(".c")
    c.write_text(textwrap.dedent(src))
    subprocess.run(["gcc", "-O1", "-o", str(out), str(c), *flags], check=True)
    return out


@pytest.fixture(scope="session")
def progs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    d = tmp_path_factory.mktemp("td-progs")
    return {
        "tool": _gcc(TOOL_C, d / "tool", "-ldl"),
        "hello": _gcc(HELLO_C, d / "hello"),
        "evil": _gcc(EVIL_C, d / "libevil.so", "-shared", "-fPIC"),
    }


class Events:
    """Decisions read from the engine's ring buffer."""

    def __init__(self, fd: int) -> None:
        self.seen: list[CEvent] = []
        self._rb = RingBuffer(fd, lambda b: self.seen.append(CEvent.from_buffer_copy(b)))

    def drain(self) -> list[CEvent]:
        self._rb.poll(50)
        self._rb.consume()
        out, self.seen = self.seen, []
        return out

    def close(self) -> None:
        self._rb.close()


@pytest.fixture
def events(enforce: Confined) -> Iterator[Events]:
    ev = Events(enforce.engine.events_fd)
    try:
        yield ev
    finally:
        ev.close()


@pytest.fixture
def marker(tmp_path: Path) -> Path:
    return tmp_path / "constructor-ran"


def _trust_tool(c: Confined, progs: dict[str, Path]) -> None:
    c.trust(closure([str(progs["tool"]), "/bin/true"]))


def _denials(evs: list[CEvent]) -> list[CEvent]:
    return [e for e in evs if e.verdict != Verdict.ALLOW]


def _b(p: Path) -> bytes:
    """A path as the kernel side reports it (symlinks resolved)."""
    return os.fsencode(os.path.realpath(p))


def _describe(e: CEvent) -> str:
    return (
        f"{Hook(e.hook).name} {Verdict(e.verdict).name} {Reason(e.reason).name} "
        f"{e.comm.decode()} {e.path.decode()} ino={e.file.ino}"
    )


def _one_denial(events: Events) -> CEvent:
    denied = _denials(events.drain())
    assert len(denied) == 1, [_describe(e) for e in denied]
    return denied[0]


# ---- exec ---------------------------------------------------------------------------------


def test_untrusted_binary(enforce: Confined, events: Events, progs: dict[str, Path]) -> None:
    enforce.trust(closure(["/bin/true"]))
    assert enforce.run(["/bin/true"]).returncode == 0
    r = enforce.run([str(progs["hello"])])
    assert r.returncode == KILLED and "hello" not in r.stdout
    e = _one_denial(events)
    st = os.stat(progs["hello"])
    assert (e.hook, e.verdict, e.reason) == (Hook.EXEC, Verdict.DENY, Reason.UNTRUSTED)
    assert e.file.to_key() == InodeKey.from_stat(st)
    assert e.path == _b(progs["hello"]) and e.comm == b"hello"
    assert (e.backend, e.mode) == (BackendId.TRACEPOINT, Mode.ENFORCE)
    assert e.pid and e.tgid == e.pid and e.ppid and e.uid == 0 and e.time_ns
    assert enforce.run([str(progs["hello"])], confined=False).stdout == "hello\n"


def test_ldso_runs_untrusted(enforce: Confined, events: Events, progs: dict[str, Path]) -> None:
    ldso = os.path.realpath("/lib64/ld-linux-x86-64.so.2")
    enforce.trust(closure(["/bin/true"]))
    r = enforce.run([ldso, str(progs["hello"])])
    assert r.returncode == KILLED and "hello" not in r.stdout
    e = _one_denial(events)
    assert (e.hook, e.path) == (Hook.MMAP, _b(progs["hello"]))
    assert enforce.run([ldso, str(progs["hello"])], confined=False).stdout == "hello\n"


def test_untrusted_elf_interpreter(
    enforce: Confined, events: Events, progs: dict[str, Path], tmp_path: Path
) -> None:
    """A trusted program whose PT_INTERP names an untrusted loader (a copy of ld.so): the kernel
    maps that loader during exec, and it is checked there, before it runs."""
    ldso = tmp_path / "myld.so"
    shutil.copy(os.path.realpath("/lib64/ld-linux-x86-64.so.2"), ldso)
    prog = _gcc(HELLO_C, tmp_path / "hello-myld", f"-Wl,--dynamic-linker={ldso}")
    enforce.trust(closure(["/bin/true"]) + [str(prog)])
    r = enforce.run([str(prog)])
    assert r.returncode == KILLED and "hello" not in r.stdout
    e = _one_denial(events)
    assert (e.hook, e.path) == (Hook.EXEC, _b(ldso))
    assert enforce.run([str(prog)], confined=False).stdout == "hello\n"
    enforce.trust([ldso])
    assert enforce.run([str(prog)]).stdout == "hello\n"


def test_script_is_judged_by_its_interpreter(
    enforce: Confined, progs: dict[str, Path], tmp_path: Path
) -> None:
    """tracepoint limit (README): by sched_process_exec the kernel has swapped a `#!` script
    for its interpreter, so a script runs when its interpreter is trusted; an untrusted
    interpreter is denied. (The lsm backend judges the script itself.)"""
    enforce.trust(closure(["/bin/sh"]))
    script = tmp_path / "s.sh"
    script.write_text("#!/bin/sh\necho script\n")
    script.chmod(0o755)
    assert enforce.run([str(script)]).stdout == "script\n"
    other = tmp_path / "other.sh"
    other.write_text(f"#!{progs['hello']}\n")
    other.chmod(0o755)
    assert enforce.run([str(other)]).returncode == KILLED


def test_ld_preload_untrusted(
    enforce: Confined, events: Events, progs: dict[str, Path], marker: Path
) -> None:
    enforce.trust(closure(["/bin/true", "env"]))
    # Through env(1), so that only the confined program gets the variable (not the wrapper).
    cmd = ["env", f"LD_PRELOAD={progs['evil']}", f"TD_MARKER={marker}", "/bin/true"]
    r = enforce.run(cmd)
    assert r.returncode == KILLED
    assert not marker.exists(), "the constructor of a denied library ran"
    assert [e.path for e in _denials(events.drain())] == [_b(progs["evil"])]
    assert enforce.run(cmd, confined=False).returncode == 0
    assert marker.exists()


def test_dlopen_untrusted(
    enforce: Confined, events: Events, progs: dict[str, Path], marker: Path
) -> None:
    _trust_tool(enforce, progs)
    env = dict(os.environ, TD_MARKER=str(marker))
    r = enforce.run([str(progs["tool"]), "dlopen", str(progs["evil"])], env=env)
    assert r.returncode == KILLED and "dlopen ok" not in r.stdout
    assert not marker.exists(), "the constructor of a denied library ran"
    e = _one_denial(events)
    assert (e.hook, e.path) == (Hook.MMAP, _b(progs["evil"]))
    r = enforce.run([str(progs["tool"]), "dlopen", str(progs["evil"])], env=env, confined=False)
    assert r.stdout == "dlopen ok\n" and marker.exists()


def test_dlopen_trusted_library_runs(
    enforce: Confined, progs: dict[str, Path], marker: Path
) -> None:
    _trust_tool(enforce, progs)
    enforce.trust([progs["evil"]])
    env = dict(os.environ, TD_MARKER=str(marker))
    r = enforce.run([str(progs["tool"]), "dlopen", str(progs["evil"])], env=env)
    assert r.returncode == 0 and r.stdout == "dlopen ok\n" and marker.exists()


@pytest.mark.parametrize("mode", ["memfd", "execveat", "procfd"])
def test_exec_by_fd(enforce: Confined, events: Events, progs: dict[str, Path], mode: str) -> None:
    """fexecve of a memfd copy, execveat(AT_EMPTY_PATH), exec through /proc/self/fd."""
    _trust_tool(enforce, progs)
    r = enforce.run([str(progs["tool"]), mode, str(progs["hello"])])
    assert r.returncode == KILLED and "hello" not in r.stdout
    e = _one_denial(events)
    assert e.hook == Hook.EXEC
    r = enforce.run([str(progs["tool"]), mode, str(progs["hello"])], confined=False)
    assert r.stdout == "hello\n"


def test_memfd_copy_of_trusted_binary_is_denied(enforce: Confined, progs: dict[str, Path]) -> None:
    """A memfd is a new inode with no path to re-hash: trusted content there is still denied."""
    _trust_tool(enforce, progs)
    enforce.trust([progs["hello"]])
    assert enforce.run([str(progs["hello"])]).returncode == 0
    assert enforce.run([str(progs["tool"]), "memfd", str(progs["hello"])]).returncode == KILLED


def test_mprotect_exec_of_untrusted_file(
    enforce: Confined, events: Events, progs: dict[str, Path]
) -> None:
    _trust_tool(enforce, progs)
    r = enforce.run([str(progs["tool"]), "mprotect", str(progs["hello"])])
    assert r.returncode == KILLED and "mprotect ok" not in r.stdout
    e = _one_denial(events)
    assert (e.hook, e.path) == (Hook.MPROTECT, _b(progs["hello"]))
    r = enforce.run([str(progs["tool"]), "mprotect", str(progs["hello"])], confined=False)
    assert r.stdout == "mprotect ok\n"


def test_mmap_exec_of_untrusted_file(
    enforce: Confined, events: Events, progs: dict[str, Path]
) -> None:
    _trust_tool(enforce, progs)
    r = enforce.run([str(progs["tool"]), "mmapx", str(progs["hello"])])
    assert r.returncode == KILLED and "mmapx ok" not in r.stdout
    e = _one_denial(events)
    assert (e.hook, e.path) == (Hook.MMAP, _b(progs["hello"]))


def test_mprotect_over_more_mappings_than_walked_fails_closed(
    enforce: Confined, events: Events, progs: dict[str, Path]
) -> None:
    _trust_tool(enforce, progs)
    r = enforce.run([str(progs["tool"]), "bigmprotect", str(progs["hello"])])
    assert r.returncode == KILLED and "ok" not in r.stdout
    e = _one_denial(events)
    assert (e.hook, e.reason) == (Hook.MPROTECT, Reason.UNVERIFIABLE)
    r = enforce.run([str(progs["tool"]), "bigmprotect", str(progs["hello"])], confined=False)
    assert r.stdout == "bigmprotect ok\n"


@pytest.fixture
def noexec_dir(tmp_path: Path) -> Iterator[Path]:
    d = tmp_path / "noexec"
    d.mkdir()
    subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "noexec,size=8m", "td-noexec", str(d)], check=True
    )
    try:
        yield d
    finally:
        subprocess.run(["umount", "-l", str(d)], check=True)


def test_failed_exec_mmap_on_noexec_mount(
    enforce: Confined, progs: dict[str, Path], noexec_dir: Path
) -> None:
    """mmap(PROT_EXEC) of a file on a noexec mount fails in the kernel, so there is no mapping
    to find: the file behind the fd is judged instead (trusted: the caller lives on)."""
    _trust_tool(enforce, progs)
    f = noexec_dir / "hello"
    shutil.copy(progs["hello"], f)
    time.sleep(0.02)  # past the ctime tick on coarse-ctime kernels
    enforce.trust([f])
    r = enforce.run([str(progs["tool"]), "mmapx", str(f)])
    assert r.returncode == 0 and r.stdout == "mmapx failed\n"
    g = noexec_dir / "other"
    shutil.copy(progs["tool"], g)
    # Untrusted: killed where the failure happens under mmap_lock (6.18); older kernels refuse
    # before taking the lock. Either way nothing of it was mapped executable.
    r = enforce.run([str(progs["tool"]), "mmapx", str(g)])
    assert r.returncode == KILLED or r.stdout == "mmapx failed\n"


def test_mprotect_of_trusted_file_runs(enforce: Confined, progs: dict[str, Path]) -> None:
    _trust_tool(enforce, progs)
    enforce.trust([progs["hello"]])
    r = enforce.run([str(progs["tool"]), "mprotect", str(progs["hello"])])
    assert r.returncode == 0 and r.stdout == "mprotect ok\n"


def test_trusted_file_modified_in_place(
    enforce: Confined, progs: dict[str, Path], tmp_path: Path
) -> None:
    enforce.trust(closure(["/bin/true"]))
    copy = tmp_path / "hello"
    shutil.copy(progs["hello"], copy)
    enforce.trust([copy])
    assert enforce.run([str(copy)]).stdout == "hello\n"
    with open(copy, "r+b") as f:  # same inode, new content
        f.seek(0, os.SEEK_END)
        f.write(b"\0")
    assert enforce.run([str(copy)]).returncode == KILLED
    assert enforce.run([str(copy)], confined=False).stdout == "hello\n"


def test_chmod_of_trusted_file_misses_without_prewarm(
    enforce: Confined, progs: dict[str, Path], tmp_path: Path
) -> None:
    """ctime is in the key: chmod makes the kernel miss (the fanotify pre-warm re-hashes)."""
    enforce.trust(closure(["/bin/true"]))
    copy = tmp_path / "hello"
    shutil.copy(progs["hello"], copy)
    time.sleep(0.02)  # past the ctime tick on coarse-ctime kernels (< 6.13)
    enforce.trust([copy])
    os.chmod(copy, 0o755)
    assert enforce.run([str(copy)]).returncode == KILLED


# ---- confinement cannot be left -------------------------------------------------------------


def test_move_to_root_cgroup_then_exec(
    enforce: Confined, events: Events, progs: dict[str, Path]
) -> None:
    """A confined root shell writes its pid to the root cgroup: it is killed for trying, and
    the untrusted binary never runs."""
    enforce.trust(closure(["/bin/sh", "/bin/true"]))
    script = f"echo $$ > {CGROUP2}/cgroup.procs; {progs['hello']}"
    r = enforce.run(["/bin/sh", "-c", script])
    assert r.returncode == KILLED and "hello" not in r.stdout
    assert any(e.hook == Hook.TAMPER and e.reason == Reason.CGROUP_ESCAPE for e in events.drain())
    r = enforce.run(["/bin/sh", "-c", script], confined=False)
    assert r.stdout == "hello\n"


def test_mark_follows_task_out_of_cgroup(audit: Confined, progs: dict[str, Path]) -> None:
    """In audit mode the escape is only logged: the escaped shell and its children are still
    judged (the mark is in task storage, not in the cgroup)."""
    ev = Events(audit.engine.events_fd)
    try:
        audit.trust(closure(["/bin/sh", "/bin/true"]))
        script = f"echo $$ > {CGROUP2}/cgroup.procs; {progs['hello']}; cat /proc/self/cgroup"
        r = audit.run(["/bin/sh", "-c", script])
        assert r.returncode == 0 and "hello" in r.stdout
        assert "0::/\n" in r.stdout  # really left the cgroup
        seen = ev.drain()
        assert [(e.hook, e.verdict) for e in seen if e.hook == Hook.TAMPER] == [
            (Hook.TAMPER, Verdict.AUDIT_DENY)
        ]
        assert any(
            e.hook == Hook.EXEC and e.verdict == Verdict.AUDIT_DENY and e.path == _b(progs["hello"])
            for e in seen
        )
        assert any(e.path.endswith(b"/cat") and e.verdict == Verdict.AUDIT_DENY for e in seen)
    finally:
        ev.close()


def test_unshare_cgroup_namespace(enforce: Confined, progs: dict[str, Path]) -> None:
    enforce.trust(closure(["/bin/sh", "unshare"]))
    r = enforce.run(["unshare", "-C", str(progs["hello"])])
    assert r.returncode == KILLED and "hello" not in r.stdout


def test_confine_by_pidfd_outside_the_cgroup(
    enforce: Confined, progs: dict[str, Path], tmp_path: Path
) -> None:
    """Backend.confine(pidfd): a task outside the scope cgroup, marked, and its children."""
    enforce.trust(closure(["/bin/sh", "/bin/true"]))
    go = tmp_path / "go"
    p = subprocess.Popen(
        ["/bin/sh", "-c", f"while [ ! -e {go} ]; do sleep 0.05; done; {progs['hello']}"],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        fd = os.pidfd_open(p.pid)
        try:
            enforce.engine.confine(fd)
            assert enforce.engine.backend.is_confined(fd)  # type: ignore[attr-defined]
        finally:
            os.close(fd)
        go.touch()
        out, _ = p.communicate(timeout=30)
        assert "hello" not in out
    finally:
        p.kill()
        p.wait()


def test_tasks_already_in_scope_are_marked_at_start(
    cgroup: Path, bpf_object: Path, progs: dict[str, Path], tmp_path: Path
) -> None:
    """A process that entered the cgroup before the engine started, and maps untrusted code
    without exec'ing again, is still judged."""
    go = tmp_path / "go"
    p = subprocess.Popen(
        [
            "/bin/sh",
            "-c",
            'echo $$ > "$0/cgroup.procs" && exec "$@"',
            str(cgroup),
            str(progs["tool"]),
            "waitmmapx",
            str(progs["hello"]),
            str(go),
        ],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        time.sleep(0.3)  # in the cgroup, waiting
        with make_engine(cgroup, bpf_object, Mode.ENFORCE) as engine:
            Confined(engine, cgroup).trust(closure([str(progs["tool"])]))
            go.touch()
            out, _ = p.communicate(timeout=30)
            assert p.returncode == KILLED and "mmapx ok" not in out
    finally:
        p.kill()
        p.wait()


def test_signal_to_supervisor_kills_sender(
    cgroup: Path, bpf_object: Path, progs: dict[str, Path]
) -> None:
    sup = subprocess.Popen(["sleep", "100"])
    try:
        engine = make_engine(cgroup, bpf_object, Mode.ENFORCE, supervisor_tgid=sup.pid)
        with engine:
            c = Confined(engine, cgroup)
            ev = Events(engine.events_fd)
            try:
                c.trust(closure(["/bin/sh", "kill"]))
                r = c.run(["/bin/sh", "-c", f"kill -CONT {sup.pid}; echo after"])
                assert r.returncode == KILLED and "after" not in r.stdout
                assert any(e.reason == Reason.SIGNAL_SUPERVISOR for e in ev.drain())
                assert sup.poll() is None
                # Unconfined, the same signal is fine.
                r = c.run(["/bin/sh", "-c", f"kill -CONT {sup.pid}; echo after"], confined=False)
                assert r.stdout == "after\n"
            finally:
                ev.close()
    finally:
        sup.kill()
        sup.wait()


# ---- modes, no false denials, life cycle ----------------------------------------------------


def test_audit_mode_allows_and_reports(audit: Confined, progs: dict[str, Path]) -> None:
    ev = Events(audit.engine.events_fd)
    try:
        audit.trust(closure(["/bin/true"]))
        r = audit.run([str(progs["hello"])])
        assert r.returncode == 0 and r.stdout == "hello\n"
        [e] = _denials(ev.drain())
        assert (e.verdict, e.mode, e.path) == (Verdict.AUDIT_DENY, Mode.AUDIT, _b(progs["hello"]))
    finally:
        ev.close()


def _trust_tree(c: Confined, roots: list[str]) -> int:
    keys = []
    for root in roots:
        for dirpath, _, files in os.walk(root):
            for f in files:
                p = os.path.join(dirpath, f)
                try:
                    st = os.stat(p)
                except OSError:
                    continue
                if os.path.isfile(p):
                    keys.append(InodeKey.from_stat(st))
    for i in range(0, len(keys), 4096):
        c.engine.trusted_inodes.add(keys[i : i + 4096])
    return len(keys)


@pytest.fixture
def enforce_big(cgroup: Path, bpf_object: Path) -> Iterator[Confined]:
    with make_engine(cgroup, bpf_object, Mode.ENFORCE, max_entries=1 << 19) as engine:
        yield Confined(engine, cgroup)


@pytest.mark.slow
def test_no_false_denials(enforce_big: Confined, progs: dict[str, Path]) -> None:
    """python3 with C extensions, bash pipelines, coreutils, git, a compiled C program."""
    enforce = enforce_big
    events = Events(enforce.engine.events_fd)
    prefix = os.path.realpath(sys.base_prefix)
    n = _trust_tree(enforce, ["/usr/bin", "/usr/lib", "/usr/libexec", prefix])
    assert n > 1000
    enforce.trust(closure([sys.executable, str(progs["tool"])]) + [str(progs["hello"])])
    py = os.path.realpath(sys.executable)
    cmds = [
        [py, "-c", "import ssl, hashlib, json, sqlite3, ctypes, decimal, zlib; print('py ok')"],
        ["/bin/bash", "-c", "ls /usr/bin | sort | head -3 | wc -l | tr -d ' '"],
        ["/bin/bash", "-c", "cat /etc/hostname | sha256sum | cut -c1-8 >/dev/null && echo ok"],
        ["git", "--version"],
        ["git", "-C", str(Path(__file__).parent), "log", "-1", "--format=%h"],
        [str(progs["hello"])],
        [str(progs["tool"]), "mprotect", str(progs["hello"])],
    ]
    for cmd in cmds:
        r = enforce.run(cmd)
        assert r.returncode == 0, (cmd, r.returncode, r.stderr, _denials(events.drain()))
    assert _denials(events.drain()) == []
    events.close()


def test_engine_detaches_on_error(cgroup: Path, bpf_object: Path) -> None:
    engine = make_engine(cgroup, bpf_object, Mode.ENFORCE)
    with pytest.raises(RuntimeError), engine:
        backend = engine.backend
        assert backend.attached  # type: ignore[attr-defined]
        raise RuntimeError("boom")
    assert not backend.attached  # type: ignore[attr-defined]
    with pytest.raises(BackendError):
        _ = engine.trusted_inodes
    # Nothing denies any more: an untrusted binary runs in the (former) scope.
    c = Confined(engine, cgroup)
    assert c.run(["/bin/true"]).returncode == 0


def test_system_wide_needs_explicit_consent() -> None:
    with pytest.raises(BackendError, match="system-wide"):
        Engine(EngineConfig(mode=Mode.ENFORCE, scope=Scope()))


def test_scope_for_cgroup(cgroup: Path) -> None:
    s = Scope.for_cgroup(cgroup)
    assert s.cgroup_level == 1 and s.cgroup_id == os.stat(cgroup).st_ino
    with pytest.raises(BackendError):
        Scope.for_cgroup(CGROUP2)


def test_select_names_the_backend_and_refusals(bpf_object: Path) -> None:
    b = select("tracepoint")
    assert b.name == "tracepoint" and b.refused == ()
    with pytest.raises(BackendError, match="unknown backend"):
        select("nope")
    best = select(None)
    # The strongest backend the kernel accepts; each stronger one says why it was refused
    # (this machine refuses BPF LSM: `tracepoint`, with the lsm refusal, when lsm is built).
    refused = [name for name, _ in best.refused]
    assert [*refused, best.name] == names()[: len(refused) + 1]
    assert all(reason for _, reason in best.refused)


def test_probe_leaves_nothing_loaded(cgroup: Path, bpf_object: Path) -> None:
    from trustdb.backends.tracepoint import TracepointBackend

    before = held_program_ids()
    assert TracepointBackend(objdir=bpf_object.parent).probe().ok
    assert held_program_ids() - before == set()
    # The check itself sees the programs (links) an engine holds:
    with make_engine(cgroup, bpf_object, Mode.AUDIT):
        assert len(held_program_ids() - before) >= 5
    assert held_program_ids() - before == set()


def test_key_matches_kernel_for_new_file(
    audit: Confined, tmp_path: Path, progs: dict[str, Path]
) -> None:
    """The key userspace computes from stat() equals the key the hook reads (dev encoding,
    ctime nsec with the multigrain flag masked), for a file whose ctime was just queried."""
    ev = Events(audit.engine.events_fd)
    try:
        audit.trust(closure(["/bin/true"]))
        f = tmp_path / "fresh"
        shutil.copy(progs["hello"], f)
        key = InodeKey.from_stat(os.stat(f))
        audit.run([str(f)])
        [e] = _denials(ev.drain())
        assert e.file.to_key() == key
        assert ctypes.sizeof(e) == ctypes.sizeof(CEvent)
    finally:
        ev.close()


# First-seen files (the fanotify handler): tests/engine/test_first_seen.py


def test_select_loaded_loads_the_chosen_object_once(cgroup: Path, bpf_object: Path) -> None:
    """`trustdb run` start-up: the real load is the probe (no second load), the stronger
    backend's refusal is still named, and a spare loaded meanwhile is not left behind."""
    from trustdb.backends import select_loaded
    from trustdb.engine import Engine

    config = EngineConfig(mode=Mode.AUDIT, scope=Scope.for_cgroup(cgroup))
    before = held_program_ids()
    with Engine(config) as engine:  # loads through select_loaded
        held = held_program_ids() - before
        assert engine.backend.refused == select(None).refused
    assert held_program_ids() - before == set()
    b = select_loaded(None, config)
    try:
        # Loaded, not attached: only the chosen object's programs are held (no probe copy, no
        # spare), the same number an attached engine holds.
        assert len(held_program_ids() - before) == len(held)
        assert [n for n, _ in b.refused] == [n for n, _ in select(None).refused]
    finally:
        b.detach()
    assert held_program_ids() - before == set()


def test_background_load_is_only_loaded_until_an_engine_takes_it(cgroup: Path,
                                                                 bpf_object: Path) -> None:
    """`trustdb run` loads the engine on a thread while it builds the rest of the run
    (backends.BackgroundLoad): what it loaded decides nothing until an Engine attaches it,
    the Engine detaches what it took, and a load no engine took is released by discard()."""
    from trustdb.backends import BackgroundLoad
    from trustdb.engine import Engine

    config = EngineConfig(mode=Mode.AUDIT, scope=Scope.for_cgroup(cgroup))
    before = held_program_ids()
    loading = BackgroundLoad("tracepoint", config)
    with Engine(config, backend=loading) as engine:
        assert engine.backend.attached
        assert len(held_program_ids() - before) >= 5
    loading.discard()  # taken: the engine already detached it
    assert held_program_ids() - before == set()
    unused = BackgroundLoad("tracepoint", config)
    unused.discard()
    assert held_program_ids() - before == set()
    failed = BackgroundLoad("nope", config)
    with pytest.raises(BackendError, match="unknown backend"), Engine(config, backend=failed):
        pass
