"""The denial line on the confined command's own stderr, which is what an agent reads.

An agent sees a tool's output, not the supervisor's terminal: on the tracepoint backend a
denied process just dies (`Killed`). So the line goes into the stderr of the task itself: the
first-seen handler writes it while the task waits in a refused open, and, for a task the BPF
programs kill (an untrusted library mapped executable), into a copy of the task's stderr it took
when the task opened that library (trustdb.held_stderr). Failing that, into the stderr of the
nearest live holder inside the tree (its parent, which normally shares it).

The tree is root and hostile and chooses what its fd 2 is. So a copy is only ever taken with
pidfd_getfd (no open, so no fanotify event of our own and no path lookup in the tree's
namespace), only of a description open for writing (we write nothing the tree could not write
itself), and only of kinds whose writes are harmless and bounded:
- a pipe: pwritev2(RWF_NOWAIT), which never blocks (EAGAIN when full) where the kernel
  supports it for pipes; where it answers EOPNOTSUPP (6.18 here) a writer thread as below
  (a splice can hold the pipe's lock, which even a non-blocking write waits for);
- a unix or IP socket: send(MSG_DONTWAIT); never netlink or packet sockets, whose sends
  are checked against the *sender's* capabilities;
- a named FIFO, a terminal, a regular file on a local disk filesystem (ext4, xfs, btrfs,
  tmpfs) whose inode is not trusted content: these have no non-blocking write that leaves the
  tree's own file flags alone (a reader that never reads, a stopped terminal, an inode lock
  held by a stalled writer), so a short-lived thread writes them, at most
  `MAX_BLOCKING_WRITERS` at a time; a thread the tree stalls costs one thread, never the
  handler;
- never /proc, /sys, cgroup or other pseudo files (a write there can act with the writer's
  privileges), FUSE, network filesystems, devices other than terminals, or the supervisor's own
  stderr (it has the line already).
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import select
import signal
import socket
import stat as statmod
import threading
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

from trustdb.fanotify import pidfd_getfd
from trustdb.fskeys import (
    BTRFS_SUPER_MAGIC,
    EXT4_SUPER_MAGIC,
    TMPFS_MAGIC,
    XFS_SUPER_MAGIC,
    fs_magic,
)

if TYPE_CHECKING:
    from trustdb.events import Decision

PIPEFS_MAGIC = 0x50495045
LOCAL_FILESYSTEMS = frozenset({EXT4_SUPER_MAGIC, XFS_SUPER_MAGIC, BTRFS_SUPER_MAGIC, TMPFS_MAGIC})
SOCKET_FAMILIES = frozenset({socket.AF_UNIX, socket.AF_INET, socket.AF_INET6})
MAX_LINE = 4000
"""Below PIPE_BUF: one write, never interleaved with the task's own output."""
MAX_BLOCKING_WRITERS = 4

IsTrusted = Callable[[os.stat_result], bool]
"""Whether a regular file's inode holds trusted content (never written by us)."""


def _never_trusted(st: os.stat_result) -> bool:
    return False


def target_kind(fd: int, is_trusted: IsTrusted = _never_trusted) -> str | None:
    """How a line may be written to `fd` (`pipe`, `socket`, `thread`), or None: never."""
    try:
        st = os.fstat(fd)
        ours = os.fstat(2)
        if (st.st_dev, st.st_ino) == (ours.st_dev, ours.st_ino):
            return None
        if fcntl.fcntl(fd, fcntl.F_GETFL) & os.O_ACCMODE not in (os.O_WRONLY, os.O_RDWR):
            return None
        if statmod.S_ISSOCK(st.st_mode):
            with socket.socket(fileno=os.dup(fd)) as s:
                return "socket" if s.family in SOCKET_FAMILIES else None
        if statmod.S_ISFIFO(st.st_mode):
            return "pipe" if fs_magic(fd) == PIPEFS_MAGIC else "thread"
        if statmod.S_ISCHR(st.st_mode):
            return "thread" if os.isatty(fd) else None
        if statmod.S_ISREG(st.st_mode) and fs_magic(fd) in LOCAL_FILESYSTEMS:
            return None if is_trusted(st) else "thread"
    except OSError:
        return None
    return None


def _encode(line: str) -> bytes:
    return (line.replace("\n", " ") + "\n").encode(errors="replace")[:MAX_LINE]


class _BlockingWrites:
    """Threads for the kinds with no non-blocking write; a stalled one is abandoned."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._running = 0

    def submit(self, fd: int, data: bytes) -> bool:
        """Writes `data` to a copy of `fd` on a thread of its own (the copy is closed there)."""
        with self._lock:
            if self._running >= MAX_BLOCKING_WRITERS:
                return False
            self._running += 1
        copy = os.dup(fd)
        threading.Thread(target=self._write, args=(copy, data), daemon=True,
                         name="stderr-line").start()
        return True

    def _write(self, fd: int, data: bytes) -> None:
        try:
            if select.select([], [fd], [], 0)[1]:
                os.write(fd, data)
        except OSError:
            pass
        finally:
            os.close(fd)
            with self._lock:
                self._running -= 1


_blocking = _BlockingWrites()


def write_line(fd: int, line: str, kind: str) -> bool:
    """Write one line to `fd` of `kind` (`target_kind`) without ever blocking the caller."""
    data = _encode(line)
    try:
        if kind == "socket":
            with socket.socket(fileno=os.dup(fd)) as s:
                return s.send(data, socket.MSG_DONTWAIT | socket.MSG_NOSIGNAL) > 0
        if kind == "pipe":
            try:
                return os.pwritev(fd, [data], -1, os.RWF_NOWAIT) > 0
            except OSError as e:
                if e.errno != 95:  # EOPNOTSUPP: an older kernel's pipe; a thread writes it
                    return False
        return _blocking.submit(fd, data)
    except OSError:
        return False


def copy_of_stderr(pidfd: int, is_trusted: IsTrusted = _never_trusted
                   ) -> tuple[int, str] | None:
    """A copy of fd 2 of the process behind `pidfd` and its kind, if a line may go there."""
    try:
        fd = pidfd_getfd(pidfd, 2)
    except OSError:
        return None
    kind = target_kind(fd, is_trusted)
    if kind is None:
        os.close(fd)
        return None
    return fd, kind


def write_to_stderr_of(pidfd: int, line: str, is_trusted: IsTrusted = _never_trusted) -> bool:
    """Write `line` to fd 2 of the process behind `pidfd`, where that is safe (module doc).
    Returns whether it was written (or handed to a writer thread)."""
    got = copy_of_stderr(pidfd, is_trusted)
    if got is None:
        return False
    fd, kind = got
    try:
        return write_line(fd, line, kind)
    finally:
        os.close(fd)


def _in_cgroup(pid: int, cgroup: str) -> bool:
    """Whether `pid` is in the cgroup2 directory `cgroup` or below it."""
    from trustdb.confine.cgroup import cgroup2_root

    try:
        text = Path(f"/proc/{pid}/cgroup").read_text()
        rel = "/" + str(Path(cgroup).relative_to(cgroup2_root()))
    except (OSError, ValueError):
        return False
    for line in text.splitlines():
        if line.startswith("0::"):
            path = line[3:].strip()
            return path == rel or path.startswith(rel + "/")
    return False


def tell_live_holder(tgid: int, ppid: int, line: str, *, cgroup: str,
                     is_trusted: IsTrusted = _never_trusted) -> bool:
    """After a BPF kill: the killed process if it still exists, else its parent, provided it
    is inside the run's `cgroup` (never a process outside the tree)."""
    for pid in (tgid, ppid):
        if pid <= 1:
            continue
        try:
            pidfd = os.pidfd_open(pid)  # first: the pid cannot be reused while we hold it
        except OSError:
            continue
        try:
            # The cgroup check then names the process the pidfd holds; if that process had
            # already exited, the pid may be another's: a signal 0 through the pidfd says.
            if not _in_cgroup(pid, cgroup):
                continue
            signal.pidfd_send_signal(pidfd, 0)
            if write_to_stderr_of(pidfd, line, is_trusted):
                return True
        except OSError:
            continue
        finally:
            os.close(pidfd)
    return False


TellHandler = Callable[["Decision", str], bool]
"""Hands a BPF denial's line to the first-seen handler (it holds the task's stderr, or finds
a live holder); False when no handler runs."""


def tree_stderr_consumer(line_of: Callable[[Decision], str], cgroup: str,
                         tell_handler: TellHandler | None = None
                         ) -> Callable[[Decision], None]:
    """A decision consumer for `trustdb run`: each BPF denial's line (`line_of`, the
    reporter's wording) also goes to the denied command's stderr."""
    told: set[tuple[int, int]] = set()

    def consume(d: Decision) -> None:
        if not d.denied or d.backend.endswith("+fanotify"):
            return  # the first-seen handler told the task itself
        key = (d.tgid, d.ino)
        if key in told:
            return
        if len(told) > 4096:
            told.clear()
        told.add(key)
        with contextlib.suppress(Exception):
            if tell_handler is not None and tell_handler(d, line_of(d)):
                return
            tell_live_holder(d.tgid, d.ppid, line_of(d), cgroup=cgroup)

    return consume


__all__ = ["copy_of_stderr", "target_kind", "tell_live_holder", "tree_stderr_consumer",
           "write_line", "write_to_stderr_of"]
