"""The denial line on the confined command's own stderr, which is what an agent reads.

An agent sees a tool's output, not the supervisor's terminal: on the tracepoint backend a
denied process just dies (`Killed`). So the line goes into the stderr of the task itself (the
first-seen handler, which answers while the task waits) or, for a task the BPF programs killed,
of the nearest live holder: its parent, which normally shares it. The file is duplicated with
pidfd_getfd (no open, so no fanotify event and no path lookup in the tree's namespace), and
written only where a write cannot block us.
"""

from __future__ import annotations

import contextlib
import os
import select
import stat as statmod
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

from trustdb.fanotify import pidfd_getfd
from trustdb.fskeys import fs_magic

if TYPE_CHECKING:
    from trustdb.events import Decision

FUSE_SUPER_MAGIC = 0x65735546
MAX_LINE = 4000
"""Below PIPE_BUF: one write, never interleaved with the task's own output."""


def write_to_stderr_of(pidfd: int, line: str) -> bool:
    """Write `line` to fd 2 of the process behind `pidfd`: a pipe, socket or terminal with
    room, or a regular file not on FUSE; never the file that is our own stderr (the supervisor
    prints there already). Returns whether it was written."""
    try:
        fd = pidfd_getfd(pidfd, 2)
    except OSError:
        return False
    try:
        st = os.fstat(fd)
        ours = os.fstat(2)
        if (st.st_dev, st.st_ino) == (ours.st_dev, ours.st_ino):
            return False
        if statmod.S_ISREG(st.st_mode):
            if fs_magic(fd) == FUSE_SUPER_MAGIC:
                return False
        elif not (statmod.S_ISFIFO(st.st_mode) or statmod.S_ISSOCK(st.st_mode)
                  or statmod.S_ISCHR(st.st_mode)) or not select.select([], [fd], [], 0)[1]:
            return False
        os.write(fd, (line + "\n").encode()[:MAX_LINE])
        return True
    except OSError:
        return False
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


def tell_live_holder(tgid: int, ppid: int, line: str, *, cgroup: str) -> bool:
    """After a BPF kill: the killed process if it still exists, else its parent, provided it
    is inside the run's `cgroup` (never a process outside the tree)."""
    for pid in (tgid, ppid):
        if pid <= 1 or not _in_cgroup(pid, cgroup):
            continue
        try:
            pidfd = os.pidfd_open(pid)
        except OSError:
            continue
        try:
            if write_to_stderr_of(pidfd, line):
                return True
        finally:
            os.close(pidfd)
    return False


def tree_stderr_consumer(line_of: Callable[[Decision], str], cgroup: str
                         ) -> Callable[[Decision], None]:
    """A decision consumer for `trustdb run`: each BPF denial's line (`line_of`, the
    reporter's wording) also goes to the killed command's stderr."""
    told: set[tuple[int, int]] = set()

    def consume(d: Decision) -> None:
        if not d.denied or d.backend.endswith("+fanotify"):
            return  # the first-seen handler told the task itself
        key = (d.tgid, d.ino)
        if key in told:
            return
        told.add(key)
        with contextlib.suppress(Exception):
            tell_live_holder(d.tgid, d.ppid, line_of(d), cgroup=cgroup)

    return consume


__all__ = ["tell_live_holder", "tree_stderr_consumer", "write_to_stderr_of"]
