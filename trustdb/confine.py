"""The confined tree of `trustdb run`: its cgroup, its namespaces, and how its first process starts.

A run owns one cgroup v2 directory, `trustdb-run-<id>`, from creation to removal. Its first
process (the "init" of a new PID namespace) is forked by the supervisor and then, in order:

1. asks the kernel for SIGKILL when the supervisor dies (PR_SET_PDEATHSIG); being the init of
   its PID namespace, its death kills every process of the namespace: if the supervisor dies for
   any reason, the whole confined tree dies with it (never fail open);
2. enters the run cgroup;
3. makes a private mount namespace in which the trust DB and /sys/fs/bpf are covered by empty
   read-only tmpfs, /proc shows only the new PID namespace (the supervisor is invisible: it cannot
   be signalled, traced or stopped by pid), /sys and a few kernel-helper configs are read-only,
   and /dev holds only harmless character devices (no block device to write the DB through);
4. says "ready" and blocks on a pipe while the supervisor marks it confined through its pidfd
   (`Backend.confine`): from then on it and every descendant are judged by the BPF programs;
5. on "go", installs the seccomp filter (trustdb.seccomp: no bpf(), mount, ptrace, module
   loading, namespaces ...), and exec's CMD. CMD is the first thing checked against the trust
   database, so CMD itself must be trusted.

A watcher process, forked before any BPF object exists (so it holds none), removes the cgroup
after the supervisor is gone, even if the supervisor was killed with SIGKILL.
"""

from __future__ import annotations

import ctypes
import errno
import os
import re
import secrets
import select
import signal
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from trustdb import seccomp

# --- <linux/sched.h>, <sys/mount.h>, <linux/mount.h>, <linux/prctl.h> ---
CLONE_NEWNS = 0x00020000
CLONE_NEWPID = 0x20000000
MS_RDONLY = 1
MS_NOSUID = 2
MS_NODEV = 4
MS_NOEXEC = 8
MS_REMOUNT = 32
MS_BIND = 4096
MS_REC = 16384
MS_PRIVATE = 1 << 18
PR_SET_PDEATHSIG = 1
PR_SET_NAME = 15
AT_FDCWD = -100
AT_RECURSIVE = 0x8000
AT_EMPTY_PATH = 0x1000
OPEN_TREE_CLONE = 1
MOVE_MOUNT_F_EMPTY_PATH = 0x4
MOUNT_ATTR_RDONLY = 0x1
SYS_OPEN_TREE = 428
SYS_MOVE_MOUNT = 429
SYS_MOUNT_SETATTR = 442

CGROUP_PREFIX = "trustdb-run-"
DEV_NODES = ("null", "zero", "full", "random", "urandom", "tty")
"""Character devices the confined tree keeps; everything else under /dev disappears."""

KERNEL_HELPER_CONFIG = (
    "/etc/modprobe.d",
    "/lib/modprobe.d",
    "/usr/lib/modprobe.d",
    "/etc/request-key.conf",
    "/etc/request-key.d",
)
"""Read by programs the *kernel* starts as root outside any cgroup (modprobe on a
request_module, request-key): an `install` line there would run untrusted code unconfined."""


class ConfineError(Exception):
    """Setting up the confined tree failed (one line)."""


_libc = ctypes.CDLL(None, use_errno=True)


def _check(rc: int, what: str) -> int:
    if rc < 0:
        err = ctypes.get_errno()
        raise ConfineError(f"{what}: {os.strerror(err)}")
    return rc


def _mount(source: str | None, target: str, fstype: str | None, flags: int,
           data: str | None = None) -> None:
    enc = (lambda s: None if s is None else s.encode())
    _check(_libc.mount(enc(source), target.encode(), enc(fstype), ctypes.c_ulong(flags),
                       enc(data)), f"mount {target}")


class _MountAttr(ctypes.Structure):
    _fields_ = [("attr_set", ctypes.c_uint64), ("attr_clr", ctypes.c_uint64),
                ("propagation", ctypes.c_uint64), ("userns_fd", ctypes.c_uint64)]


def _read_only_tree(path: str) -> None:
    """Make the mount at `path` and every mount below it read-only (in this namespace only)."""
    attr = _MountAttr(MOUNT_ATTR_RDONLY, 0, 0, 0)
    _check(_libc.syscall(SYS_MOUNT_SETATTR, AT_FDCWD, path.encode(), AT_RECURSIVE,
                         ctypes.byref(attr), ctypes.sizeof(attr)), f"read-only {path}")


def _clone_mount(path: str, recursive: bool = False) -> int:
    """A detached copy of the mount at `path` (open_tree), to re-attach after /dev is covered."""
    flags = OPEN_TREE_CLONE | os.O_CLOEXEC | (AT_RECURSIVE if recursive else 0)
    return _check(_libc.syscall(SYS_OPEN_TREE, AT_FDCWD, path.encode(), flags), f"clone {path}")


def _attach_mount(fd: int, target: str) -> None:
    _check(_libc.syscall(SYS_MOVE_MOUNT, fd, b"", AT_FDCWD, target.encode(),
                         MOVE_MOUNT_F_EMPTY_PATH), f"attach {target}")
    os.close(fd)


def _unshare(flags: int) -> None:
    _check(_libc.unshare(flags), "unshare")


def _setns(fd: int, nstype: int) -> None:
    _check(_libc.setns(fd, nstype), "setns")


def _set_name(name: str) -> None:
    _libc.prctl(PR_SET_NAME, name.encode()[:15], 0, 0, 0)


# --------------------------------------------------------------------------------------------
# cgroup v2


def cgroup2_root() -> Path:
    """Where cgroup v2 is mounted: /sys/fs/cgroup/unified on hybrid hosts, else /sys/fs/cgroup."""
    with open("/proc/self/mountinfo") as f:
        for line in f:
            left, _, right = line.partition(" - ")
            if right.split(" ", 1)[0] == "cgroup2":
                return Path(left.split()[4])
    raise ConfineError("cgroup v2 is not mounted (trustdb run needs it)")


@dataclass
class RunCgroup:
    """One `trustdb-run-<id>` cgroup: created empty, killed and removed on every exit path."""

    path: Path
    id: int
    """The cgroup id the BPF programs see (the inode number of the directory)."""

    @classmethod
    def create(cls, root: Path | None = None) -> RunCgroup:
        root = root or cgroup2_root()
        path = root / f"{CGROUP_PREFIX}{os.getpid()}-{secrets.token_hex(4)}"
        try:
            path.mkdir(mode=0o755)
        except OSError as e:
            raise ConfineError(f"cannot create cgroup {path}: {e.strerror}") from e
        return cls(path=path, id=path.stat().st_ino)

    def populated(self) -> bool:
        try:
            text = (self.path / "cgroup.events").read_text()
        except FileNotFoundError:
            return False
        return "populated 1" in text

    def kill(self) -> None:
        """SIGKILL every process in the cgroup (cgroup.kill, kernel 5.14+), idempotent."""
        try:
            (self.path / "cgroup.kill").write_text("1")
        except FileNotFoundError:
            pass

    def remove(self, timeout: float = 5.0) -> None:
        """Kill what is left, wait until the cgroup is empty, remove it. Idempotent."""
        if not self.path.exists():
            return
        self.kill()
        deadline = time.monotonic() + timeout
        while True:
            try:
                self.path.rmdir()
                return
            except FileNotFoundError:
                return
            except OSError as e:
                if e.errno != errno.EBUSY or time.monotonic() > deadline:
                    raise ConfineError(f"cannot remove cgroup {self.path}: {e.strerror}") from e
            time.sleep(0.01)


def start_watcher(cgroup: RunCgroup) -> int:
    """Fork a process that removes `cgroup` once this process is gone, however it ends.

    Call before loading any BPF object: the watcher must hold none of the fds that keep the
    programs attached. It ignores terminal signals (a Ctrl-C reaches the whole process group)
    and does nothing but wait for our pidfd to become readable."""
    supervisor = os.pidfd_open(os.getpid())
    pid = os.fork()
    if pid:
        os.close(supervisor)
        return pid
    try:
        _set_name("trustdb-reaper")
        for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP, signal.SIGQUIT):
            signal.signal(sig, signal.SIG_IGN)
        devnull = os.open("/dev/null", os.O_RDWR)
        for fd in (0, 1, 2):
            os.dup2(devnull, fd)
        os.chdir("/")
        os.closerange(3, supervisor)
        poller = select.poll()
        poller.register(supervisor, select.POLLIN)
        while not poller.poll():
            pass
        cgroup.remove(timeout=30.0)
    finally:
        os._exit(0)


def stale_cgroups(root: Path | None = None) -> list[Path]:
    """Run cgroups whose supervisor is gone (a watcher that was itself killed leaves these)."""
    root = root or cgroup2_root()
    stale = []
    for p in root.glob(f"{CGROUP_PREFIX}*"):
        pid = p.name[len(CGROUP_PREFIX):].split("-", 1)[0]
        if pid.isdigit() and not Path(f"/proc/{pid}").exists():
            stale.append(p)
    return stale


# --------------------------------------------------------------------------------------------
# the mount namespace the confined tree sees


@dataclass(frozen=True)
class MountPlan:
    """What the confined tree must not reach through the filesystem."""

    hidden: tuple[str, ...]
    """Covered by an empty read-only tmpfs: the trust DB directory, /sys/fs/bpf."""
    read_only: tuple[str, ...] = ()
    """Bind-mounted read-only: the decision log, trustdb's own code, kernel-helper configs."""

    @classmethod
    def for_run(cls, db: Path, extra_read_only: Sequence[str] = ()) -> MountPlan:
        package = str(Path(__file__).resolve().parent)
        return cls(
            hidden=(str(db.resolve()), "/sys/fs/bpf"),
            read_only=(package, "/etc/trustdb", *KERNEL_HELPER_CONFIG, *extra_read_only),
        )


def _minimal_dev() -> None:
    """Replace /dev with a tmpfs holding only DEV_NODES, /dev/pts (the terminal) and a private
    /dev/shm: no disk, /dev/mem or /dev/kmsg to go around the covers with."""
    kept = {name: _clone_mount(f"/dev/{name}") for name in DEV_NODES if os.path.exists(f"/dev/{name}")}
    pts = _clone_mount("/dev/pts", recursive=True) if os.path.ismount("/dev/pts") else -1
    _mount("tmpfs", "/dev", "tmpfs", MS_NOSUID | MS_NOEXEC, "mode=0755,size=64k")
    for name, fd in kept.items():
        os.close(os.open(f"/dev/{name}", os.O_CREAT | os.O_WRONLY, 0o666))
        _attach_mount(fd, f"/dev/{name}")
    os.mkdir("/dev/pts")
    if pts >= 0:
        _attach_mount(pts, "/dev/pts")
        os.symlink("pts/ptmx", "/dev/ptmx")
    os.mkdir("/dev/shm", 0o1777)
    _mount("tmpfs", "/dev/shm", "tmpfs", MS_NOSUID | MS_NODEV, "mode=1777")
    for name, target in (("fd", "/proc/self/fd"), ("stdin", "/proc/self/fd/0"),
                         ("stdout", "/proc/self/fd/1"), ("stderr", "/proc/self/fd/2")):
        os.symlink(target, f"/dev/{name}")
    _mount(None, "/dev", None, MS_REMOUNT | MS_RDONLY | MS_NOSUID | MS_NOEXEC)


def _bind_read_only(path: str) -> None:
    _mount(path, path, None, MS_BIND | MS_REC)
    _read_only_tree(path)


def _unescape(field: str) -> str:
    return re.sub(r"\\([0-7]{3})", lambda m: chr(int(m.group(1), 8)), field)


def _under(path: str, top: str) -> bool:
    return top == "/" or path == top or path.startswith(top.rstrip("/") + "/")


def mount_aliases(path: str) -> list[str]:
    """Other paths that reach the directory `path`: its filesystem mounted, or bind-mounted,
    somewhere else too (a cover on one path would leave the other open)."""
    try:
        st = os.stat(path)
    except OSError:
        return []
    dev = f"{os.major(st.st_dev)}:{os.minor(st.st_dev)}"
    mounts = []
    with open("/proc/self/mountinfo") as f:
        for line in f:
            fields = line.split()
            if fields[2] == dev:
                mounts.append((_unescape(fields[3]), _unescape(fields[4])))
    holders = [m for m in mounts if _under(path, m[1])]
    if not holders:
        return []
    own = max(holders, key=lambda m: len(m[1]))
    in_fs = os.path.normpath(os.path.join(own[0], os.path.relpath(path, own[1])))
    aliases = []
    for root, mountpoint in mounts:
        if (root, mountpoint) != own and _under(in_fs, root):
            alias = os.path.normpath(os.path.join(mountpoint, os.path.relpath(in_fs, root)))
            if alias != path and os.path.isdir(alias):
                aliases.append(alias)
    return sorted(set(aliases))


def apply_mount_plan(plan: MountPlan) -> None:
    """Build the confined view. Runs in the child, after unshare(CLONE_NEWNS), as the init of the
    new PID namespace (so the new /proc shows only the confined tree)."""
    hidden = [a for p in plan.hidden for a in (p, *mount_aliases(p))]
    _mount(None, "/", None, MS_REC | MS_PRIVATE)  # nothing below propagates back to the host
    _minimal_dev()
    _mount("proc", "/proc", "proc", MS_NOSUID | MS_NODEV | MS_NOEXEC)
    # core_pattern, modprobe, binfmt_misc and sysrq would each run code outside the tree.
    for p in ("/proc/sys", "/proc/sysrq-trigger"):
        if os.path.exists(p):
            _bind_read_only(p)
    # cgroup files (moves, freeze, kill), uevent_helper, tracefs, securityfs: read-only.
    _read_only_tree("/sys")
    for p in hidden:
        if os.path.isdir(p):
            _mount("tmpfs", p, "tmpfs", MS_RDONLY | MS_NOSUID | MS_NODEV | MS_NOEXEC,
                   "mode=0555,size=4k")
        elif os.path.exists(p):
            _mount("/dev/null", p, None, MS_BIND)
    for p in plan.read_only:
        if os.path.exists(p):
            _bind_read_only(p)


# --------------------------------------------------------------------------------------------
# the confined child


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


def spawn(argv: Sequence[str], cgroup: RunCgroup, plan: MountPlan,
          env: dict[str, str] | None = None) -> ConfinedChild:
    """Fork the init of a new PID namespace; returns once it is in the cgroup with its mount
    namespace built, waiting at the gate. Call before any thread is started."""
    env = dict(os.environ if env is None else env)
    executable = resolve_command(argv, env)
    filter_prog = seccomp.build_filter()  # fails here, not in the child, on an unknown arch
    go_r, go_w = os.pipe2(os.O_CLOEXEC)
    st_r, st_w = os.pipe2(os.O_CLOEXEC)
    own_pidns = os.open("/proc/self/ns/pid", os.O_RDONLY | os.O_CLOEXEC)
    # unshare(CLONE_NEWPID) only changes where our *next* child goes; setns back right after.
    _unshare(CLONE_NEWPID)
    try:
        pid = os.fork()
    except BaseException:
        _setns(own_pidns, CLONE_NEWPID)
        raise
    if pid:
        _setns(own_pidns, CLONE_NEWPID)
    else:
        os.close(go_w)
        os.close(st_r)
        _child(executable, list(argv), env, cgroup, plan, filter_prog, go_r, st_w)
    os.close(own_pidns)
    os.close(go_r)
    os.close(st_w)
    pidfd = os.pidfd_open(pid)
    child = ConfinedChild(pid=pid, pidfd=pidfd, _go=go_w, _status=st_r, argv=list(argv))
    ready = os.read(st_r, 1)
    if ready != b"R":
        message = (ready + _read_all(st_r)).decode(errors="replace")
        child.abort()
        child.close()
        raise ConfineError(message.lstrip("E") or "confined child died during setup")
    return child


def _child(executable: str, argv: list[str], env: dict[str, str], cgroup: RunCgroup,
           plan: MountPlan, filter_prog: list[seccomp.Instruction], go: int, status: int) -> None:
    """Runs in the forked child; never returns."""
    try:
        _libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
        for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP, signal.SIGQUIT):
            signal.signal(sig, signal.SIG_DFL)
        (cgroup.path / "cgroup.procs").write_text("0")
        _unshare(CLONE_NEWNS)
        apply_mount_plan(plan)
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


__all__ = [
    "ConfineError",
    "ConfinedChild",
    "MountPlan",
    "RunCgroup",
    "cgroup2_root",
    "resolve_command",
    "spawn",
    "stale_cgroups",
    "start_watcher",
]
