"""The confined child: the init of a new PID namespace, held at a gate until the engine has
marked it, then hardened and exec'd (see trustdb.confine for the order)."""

from __future__ import annotations

import os
import signal
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from trustdb.confine import hardening, seccomp
from trustdb.confine.cgroup import RunCgroup
from trustdb.confine.mounts import MountPlan, apply_mount_plan
from trustdb.confine.syscalls import (
    CLONE_NEWNS,
    CLONE_NEWPID,
    PR_SET_PDEATHSIG,
    ConfineError,
    libc,
    setns,
    unshare,
)


@dataclass
class ConfinedChild:
    """The init of the confined PID namespace, held at the gate until `release()`."""

    pid: int
    pidfd: int
    _go: int
    _status: int
    argv: list[str] = field(default_factory=list)

    def release(self) -> None:
        """Let the child exec CMD (call once it is confined). Raises ConfineError if the exec
        itself failed (missing file, not executable)."""
        os.write(self._go, b"G")
        os.close(self._go)
        self._go = -1
        message = _read_all(self._status)
        os.close(self._status)
        self._status = -1
        if message:
            raise ConfineError(message.decode(errors="replace"))

    def abort(self) -> None:
        """Kill the child before it ran anything (setup of the engine failed)."""
        for fd in (self._go, self._status):
            if fd >= 0:
                os.close(fd)
        self._go = self._status = -1
        try:
            signal.pidfd_send_signal(self.pidfd, signal.SIGKILL)
        except ProcessLookupError:
            pass
        self.wait()

    def wait(self) -> int:
        """Block until CMD ends; its exit status (128 + signal if killed, like a shell)."""
        while True:
            try:
                _, status = os.waitpid(self.pid, 0)
            except InterruptedError:
                continue
            except ChildProcessError:
                return 255
            break
        if os.WIFSIGNALED(status):
            return 128 + os.WTERMSIG(status)
        return os.WEXITSTATUS(status)

    def close(self) -> None:
        if self.pidfd >= 0:
            os.close(self.pidfd)
            self.pidfd = -1


def _read_all(fd: int) -> bytes:
    chunks = []
    while chunk := os.read(fd, 4096):
        chunks.append(chunk)
    return b"".join(chunks)


def resolve_command(argv: Sequence[str], env: dict[str, str]) -> str:
    """The file CMD names, looked up like a shell does (so that a denial can name it)."""
    if not argv:
        raise ConfineError("no command given (usage: trustdb run -- CMD ARGS...)")
    name = argv[0]
    candidates = [name] if "/" in name else [
        os.path.join(d or ".", name) for d in env.get("PATH", os.defpath).split(os.pathsep)
    ]
    for c in candidates:
        if os.path.isfile(c) and os.access(c, os.X_OK):
            return os.path.abspath(c)
    raise ConfineError(f"{name}: command not found")


@dataclass(frozen=True)
class ExecSetup:
    """How the child is hardened right before exec (after the gate)."""

    deny_write_execute: bool = True
    """PR_SET_MDWE: no anonymous W+X memory. False when the policy allows a JIT."""
    terminal: int = -1
    """The pty slave to make the controlling terminal (trustdb.confine.pty), or -1."""
    terminal_replaces: tuple[int, ...] = ()
    filesystem: Callable[[], Callable[[], None]] | None = None
    """Built after the mounts (inside the new namespace); returns the step that applies it
    right before exec (Landlock: the ruleset is made before the gate, enforced after)."""
    cwd: str | None = None
    ip_sockets: tuple[tuple[int, int], ...] | None = None
    """The only IP socket kinds the tree may create (seccomp.TCP_ONLY...); None: any."""


def spawn(argv: Sequence[str], cgroup: RunCgroup, plan: MountPlan,
          env: dict[str, str] | None = None, setup: ExecSetup = ExecSetup(),
          forked: Callable[[], None] | None = None) -> ConfinedChild:
    """Fork the init of a new PID namespace; returns once it is in the cgroup with its mount
    namespace built, waiting at the gate. Call before any thread is started. `forked` runs in
    this process right after the fork, while the child builds its namespace (threads may start
    there: the fork is behind us)."""
    env = dict(os.environ if env is None else env)
    executable = resolve_command(argv, env)
    filter_prog = seccomp.build_filter(ip_sockets=setup.ip_sockets)  # fails here, not in the child, on an unknown arch
    go_r, go_w = os.pipe2(os.O_CLOEXEC)
    st_r, st_w = os.pipe2(os.O_CLOEXEC)
    own_pidns = os.open("/proc/self/ns/pid", os.O_RDONLY | os.O_CLOEXEC)
    # unshare(CLONE_NEWPID) only changes where our *next* child goes; setns back right after.
    unshare(CLONE_NEWPID)
    try:
        pid = os.fork()
    except BaseException:
        setns(own_pidns, CLONE_NEWPID)
        raise
    if pid:
        setns(own_pidns, CLONE_NEWPID)
    else:
        os.close(go_w)
        os.close(st_r)
        _child(executable, list(argv), env, cgroup, plan, setup, filter_prog, go_r, st_w)
    os.close(own_pidns)
    os.close(go_r)
    os.close(st_w)
    pidfd = os.pidfd_open(pid)
    child = ConfinedChild(pid=pid, pidfd=pidfd, _go=go_w, _status=st_r, argv=list(argv))
    if forked is not None:
        try:
            forked()
        except BaseException:
            child.abort()
            child.close()
            raise
    ready = os.read(st_r, 1)
    if ready != b"R":
        message = (ready + _read_all(st_r)).decode(errors="replace")
        child.abort()
        child.close()
        raise ConfineError(message.lstrip("E") or "confined child died during setup")
    return child


def _child(executable: str, argv: list[str], env: dict[str, str], cgroup: RunCgroup,
           plan: MountPlan, setup: ExecSetup, filter_prog: list[seccomp.Instruction], go: int,
           status: int) -> None:
    """Runs in the forked child; never returns."""
    try:
        libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
        for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP, signal.SIGQUIT):
            signal.signal(sig, signal.SIG_DFL)
        (cgroup.path / "cgroup.procs").write_text("0")
        unshare(CLONE_NEWNS)
        apply_mount_plan(plan)
        if setup.cwd is not None:
            os.chdir(setup.cwd)
        restrict_filesystem = setup.filesystem() if setup.filesystem else None
        os.write(status, b"R")
    except BaseException as e:  # noqa: BLE001 - report any failure to the supervisor, then die
        _report_and_exit(status, f"E{_one_line(e)}")
    # The gate: EOF (the supervisor died or gave up) means never exec anything.
    if os.read(go, 1) != b"G":
        os._exit(1)
    try:
        # Python ignores SIGPIPE and SIGXFSZ; ignored signals survive exec, defaults do not.
        for sig in (signal.SIGPIPE, signal.SIGXFSZ):
            signal.signal(sig, signal.SIG_DFL)
        hardening.new_session(setup.terminal, setup.terminal_replaces)
        hardening.drop_capabilities()
        if setup.deny_write_execute:
            hardening.deny_write_execute()
        if restrict_filesystem is not None:
            restrict_filesystem()  # Landlock: closes its ruleset fd once enforced
        keep = sorted({0, 1, 2, status})
        for lo, hi in zip(keep, keep[1:] + [os.sysconf("SC_OPEN_MAX")]):
            os.closerange(lo + 1, hi)
        seccomp.install(filter_prog)
        os.execve(executable, argv, env)
    except BaseException as e:  # noqa: BLE001 - the supervisor shows it; the child must die
        _report_and_exit(status, f"{argv[0]}: {_one_line(e)}")


def _one_line(e: BaseException) -> str:
    if isinstance(e, OSError) and e.strerror:
        return f"{e.strerror}" + (f": {e.filename}" if e.filename else "")
    return str(e).splitlines()[0] if str(e) else type(e).__name__


def _report_and_exit(fd: int, message: str) -> None:
    try:
        os.write(fd, message.encode())
    finally:
        os._exit(127)
