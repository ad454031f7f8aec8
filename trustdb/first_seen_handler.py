"""The process that answers the tree's fanotify permission events (trustdb.first_seen decides).

Why a process of its own: a permission handler that is a *thread* of a process which spawns
subprocesses can deadlock on Debian's Python 3.11.2 (CPython gh-104372: the spawning thread
holds the GIL while its child's exec waits in the permission event for our answer). This
handler is forked once, before the tree runs, from a process that has finished loading; it
never forks, execs or imports again. It holds the two fanotify groups, the BPF maps, and a
read-only handle of the trust database that it opens itself after the fork.

What is marked:
- `trustdb run`: every mount of the confined child's own mount namespace (reached through
  /proc/<pid>/root), FAN_MARK_MOUNT. Those mounts are copies only the tree uses, so an exec or
  open anywhere else on the machine raises no event and pays nothing.
- the service (`system_wide`): every exec-capable filesystem, FAN_MARK_FILESYSTEM.
After a file is verified its inode gets an ignore mark: later opens and execs raise no event.
The kernel clears ignore marks when the content is modified; chmod, chown, link, rename, utime
and xattr change ctime (part of the key) without clearing them, so a second group watches each
ignored inode for FAN_ATTRIB / FAN_MOVE_SELF and drops every ignore mark when one fires (the
next open of each file asks again), until the BPF side recognises this handler's group: then
an ignore mark carrying VOUCHED_BIT vouches for the inode's unmodified content even after its
key went stale (bpf/vouch.bpf.h), and the marks stay. A change of the database generation
drops every mark.

Modules: this one (the parent's side: fork, ready line, denials, counters, stop),
trustdb.first_seen_serve (the handler process and its loop), trustdb.first_seen_marks (what
is marked, and which files' opens must stay visible).
"""

from __future__ import annotations

import contextlib
import json
import mmap
import os
import select
import signal
import sys
import time
from typing import TYPE_CHECKING

from trustdb.first_seen_marks import HandlerError, host_filesystems, tree_mounts
from trustdb.first_seen_serve import (
    START_TIMEOUT_S,
    STATS_FORMAT,
    STATS_NAMES,
    Denial,
    HandlerConfig,
    Serve,
)

if TYPE_CHECKING:
    from trustdb.events import Decision

# --- the parent's side ------------------------------------------------------------------------


class FirstSeenHandler:
    """Forks the handler process and talks to it: ready, denial lines, counters, stop."""

    def __init__(self, config: HandlerConfig) -> None:
        self._config = config
        self._pid = 0
        self._ctl_w = -1
        self._report_r = -1
        self._stats = mmap.mmap(-1, mmap.PAGESIZE)
        self._buffer = b""
        self._gone = False
        self.group_fd = -1
        """The handler's permission group, as an fd number in its own process (for the BPF
        side to recognise its ignore marks: `Backend.vouch_by`)."""

    @property
    def pid(self) -> int:
        return self._pid

    def start(self, *, tree_pid: int = 0, mounts: list[str] | None = None) -> None:
        """Mark the mounts of `tree_pid`'s namespace, or (0) every filesystem, and answer.
        `mounts`: mark exactly these mounts instead (a test's own tmpfs)."""
        targets = mounts or (tree_mounts(tree_pid) if tree_pid else host_filesystems())
        how = "mount" if tree_pid or mounts else "filesystem"
        ctl_r, ctl_w = os.pipe2(os.O_CLOEXEC)
        report_r, report_w = os.pipe2(os.O_CLOEXEC)
        sys.stdout.flush()
        sys.stderr.flush()
        pid = os.fork()
        if pid == 0:  # the handler: never returns
            code = 1
            try:
                os.close(ctl_w)
                os.close(report_r)
                code = Serve(self._config, self._stats, ctl_r, report_w).run(targets, how)
            except BaseException as e:  # noqa: BLE001 - report, then leave without cleanup
                with contextlib.suppress(OSError):
                    os.write(report_w, f"E {type(e).__name__}: {e}\n".encode())
            os._exit(code)
        os.close(ctl_r)
        os.close(report_w)
        os.set_blocking(ctl_w, False)
        self._pid, self._ctl_w, self._report_r = pid, ctl_w, report_r
        self._wait_ready()

    def _wait_ready(self) -> None:
        deadline = time.monotonic() + START_TIMEOUT_S
        while b"\n" not in self._buffer:
            left = deadline - time.monotonic()
            if left <= 0 or not select.select([self._report_r], [], [], left)[0]:
                self.stop()
                raise HandlerError("first-seen handler did not start in time")
            chunk = os.read(self._report_r, 4096)
            if not chunk:
                break
            self._buffer += chunk
        line, _, self._buffer = self._buffer.partition(b"\n")
        ready, _, fd = line.partition(b" ")
        if ready == b"R" and fd.isdigit():
            self.group_fd = int(fd)
            os.set_blocking(self._report_r, False)
            return
        self.stop()
        raise HandlerError(f"first-seen handler: {line[2:].decode(errors='replace')}"
                           if line else "first-seen handler died at start")

    def vouched(self) -> None:
        """The BPF side now recognises this handler's ignore marks: ctime-only changes need
        no flush any more (told to the handler process through its control pipe)."""
        self._send(b"V\n")

    def tell(self, d: Decision, line: str) -> bool:
        """Hand a BPF denial's line to the handler: it writes it into the stderr copy it holds
        of the denied task, or to a live holder in the tree (trustdb.held_stderr). Never
        blocks: False when the handler is gone or its pipe is full."""
        kill = {"tgid": d.tgid, "ppid": d.ppid, "dev": d.dev, "ino": d.ino, "line": line[:3000]}
        return self._send(b"K " + json.dumps(kill).encode() + b"\n")

    def _send(self, message: bytes) -> bool:
        """One message on the control pipe: atomic (below PIPE_BUF) and non-blocking."""
        if self._ctl_w < 0:
            return False
        try:
            return os.write(self._ctl_w, message) == len(message)
        except OSError:
            return False

    def fileno(self) -> int:
        """Readable when denial lines are waiting (`denials()`)."""
        return self._report_r

    def denials(self) -> list[Denial]:
        """The denials the handler made since the last call."""
        if self._report_r < 0:
            return []
        with contextlib.suppress(BlockingIOError, OSError):
            while chunk := os.read(self._report_r, 65536):
                self._buffer += chunk
            self._gone = True  # end of file: the handler process is gone
        *lines, self._buffer = self._buffer.split(b"\n")
        return [Denial(**json.loads(ln[2:])) for ln in lines if ln.startswith(b"D ")]

    def stats(self) -> dict[str, int]:
        return dict(zip(STATS_NAMES, STATS_FORMAT.unpack_from(self._stats, 0), strict=True))

    @property
    def gone(self) -> bool:
        """The handler process ended while it should still answer (a crash, the OOM killer):
        its group is freed, the kernel allowed what was pending, and nothing judges scripts or
        first-seen copies any more. Seen by `denials()` (its report pipe reads end of file)."""
        return self._gone

    def stop(self, *, wait: bool = True) -> None:
        """End the handler; the kernel then allows what is pending (the BPF programs still
        decide). Idempotent. `wait=False` (the end of `trustdb run`, whose tree is gone and
        whose process exits next): do not wait for the handler's exit, where the kernel tears
        down its fanotify groups (10-40 ms); it leaves on the end of file of its control pipe,
        or on our exit (PR_SET_PDEATHSIG)."""
        if self._ctl_w >= 0:
            os.close(self._ctl_w)  # EOF: the handler leaves its loop
            self._ctl_w = -1
        if self._pid and not wait:
            self._pid = 0
        if self._pid:
            if not _exited_within(self._pid, 2.0):
                with contextlib.suppress(ProcessLookupError):
                    os.kill(self._pid, signal.SIGKILL)
                with contextlib.suppress(ChildProcessError):
                    os.waitpid(self._pid, 0)
            self._pid = 0
        if self._report_r >= 0:
            os.close(self._report_r)
            self._report_r = -1


def _exited_within(pid: int, seconds: float) -> bool:
    """Reap child `pid` if it exits within `seconds`: woken by its pidfd the moment it does
    (a poll every few ms cost `trustdb run` up to one period at each stop)."""
    try:
        pidfd = os.pidfd_open(pid)
    except ProcessLookupError:
        pidfd = -1  # already reaped by someone, or gone: waitpid below says
    try:
        if pidfd >= 0:
            select.select([pidfd], [], [], seconds)
        return os.waitpid(pid, os.WNOHANG) != (0, 0)
    except ChildProcessError:
        return True
    finally:
        if pidfd >= 0:
            os.close(pidfd)


__all__ = ["Denial", "FirstSeenHandler", "HandlerConfig", "HandlerError", "host_filesystems",
           "tree_mounts"]
