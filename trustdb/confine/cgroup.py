"""The run's cgroup v2 directory: created empty, killed and removed on every exit path, and the
reaper process that removes it even when the supervisor is killed."""

from __future__ import annotations

import errno
import os
import secrets
import select
import signal
import time
from dataclasses import dataclass
from pathlib import Path

from trustdb.confine.syscalls import ConfineError, set_name

CGROUP_PREFIX = "trustdb-run-"


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
        set_name("trustdb-reaper")
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
