"""Copies of confined tasks' stderr, taken before the BPF programs may kill them.

The tracepoint backend cannot fail an mmap: a task that maps an untrusted library executable
is killed, its fds close with it, and an agent reading the tool's stderr pipe would read EOF
before any line could be written. So when a confined task makes the plain open that ld.so,
dlopen and ctypes make before their mmap, of untrusted ELF code, or execs a file the handler
cannot judge (the BPF programs decide), the first-seen handler takes a copy of the task's fd 2
(`trustdb.denial_stderr.copy_of_stderr`: pidfd_getfd, safe kinds only) and keeps it while the
task lives. While held, the pipe stays open: the reader's EOF waits for us.

The BPF denial reaches us from the supervisor (it reads the ring buffer and forwards the
reporter's line, with the denied inode: `tell`); the line, with the digest we hashed, goes into
the copy, which is then let go. A task that exits without one (it only read the file: a linker,
cp) is let go once the supervisor has consumed every ring buffer record submitted before the
exit: a kill's record is submitted before the task can die, and the supervisor forwards each
record before its consumer position moves past it. So no line is lost to that race, and a
reader's EOF waits one supervisor wake-up, not a fixed grace.
"""

from __future__ import annotations

import contextlib
import mmap
import os
import select
import struct
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from trustdb.denial_stderr import IsTrusted, copy_of_stderr, write_line
from trustdb.first_seen import Checked, Outcome
from trustdb.model import FileKind

MAX_HELD = 128
"""Processes whose stderr is held at once (two fds each); past that, no copy is taken."""
MAX_WAIT_S = 2.0
"""How long an exited task's copy waits for the supervisor (which may have died)."""
SETTLE_POLL_MS = 5
_POSITION = struct.Struct("=Q")


class RingPositions:
    """The consumer and producer positions of a BPF ring buffer, mapped read-only."""

    def __init__(self, map_fd: int) -> None:
        self._pages = mmap.mmap(map_fd, 2 * mmap.PAGESIZE, mmap.MAP_SHARED, mmap.PROT_READ)

    @property
    def consumer(self) -> int:
        return int(_POSITION.unpack_from(self._pages, 0)[0])

    @property
    def producer(self) -> int:
        return int(_POSITION.unpack_from(self._pages, mmap.PAGESIZE)[0])

    def close(self) -> None:
        self._pages.close()


@dataclass
class _Held:
    pid: int
    pidfd: int
    fd: int
    kind: str
    digests: dict[tuple[int, int], bytes] = field(default_factory=dict)
    """(dev, ino) -> the untrusted digest the handler hashed, for the line."""
    exit_position: int | None = None
    exited_at: float = 0.0


class HeldStderrs:
    def __init__(self, events_fd: int, poller: select.poll, is_trusted: IsTrusted) -> None:
        self._ring: RingPositions | None = None
        if events_fd >= 0:
            with contextlib.suppress(OSError, ValueError):
                self._ring = RingPositions(events_fd)
        self._poller = poller
        self._is_trusted = is_trusted
        self._by_pid: dict[int, _Held] = {}
        self._by_pidfd: dict[int, _Held] = {}
        self.written = 0

    def hold(self, pid: int, pidfd: int, dev: int, ino: int, digest: bytes | None) -> None:
        """Keep a copy of `pid`'s stderr until it exits (see the module doc)."""
        held = self._by_pid.get(pid)
        if held is not None and held.exit_position is not None:
            self._release(held)  # a reused pid: the old one is gone
            held = None
        if held is None:
            if len(self._by_pid) >= MAX_HELD:
                return
            got = copy_of_stderr(pidfd, self._is_trusted)
            if got is None:
                return
            held = _Held(pid, os.dup(pidfd), *got)
            self._by_pid[pid] = held
            self._by_pidfd[held.pidfd] = held
            self._poller.register(held.pidfd, select.POLLIN)
        if digest is not None:
            held.digests[(dev, ino)] = digest

    def owns(self, fd: int) -> bool:
        return fd in self._by_pidfd

    def exited(self, pidfd: int) -> None:
        """`pidfd` became readable: its task exited. Wait for the supervisor to catch up."""
        held = self._by_pidfd[pidfd]
        self._poller.unregister(pidfd)
        held.exit_position = self._ring.producer if self._ring is not None else 0
        held.exited_at = time.monotonic()

    def tell(self, pid: int, dev: int, ino: int, line: str) -> bool:
        """Write the supervisor's line for a denial of `pid` into its held stderr."""
        held = self._by_pid.get(pid)
        if held is None:
            return False
        digest = held.digests.get((dev, ino))
        if digest is not None:
            line = f"{line} (content blake3 {digest.hex()})"
        self.written += write_line(held.fd, line, held.kind)
        self._release(held)
        return True

    def poll_timeout_ms(self) -> int | None:
        """How soon `settle` must run again (None: no exited task waits)."""
        waiting = any(h.exit_position is not None for h in self._by_pid.values())
        return SETTLE_POLL_MS if waiting else None

    def settle(self, read_lines: Callable[[], None]) -> None:
        """Let go of exited tasks' copies once the supervisor consumed past their exit;
        `read_lines` takes in what it sent meanwhile (its lines were sent before it moved)."""
        waiting = [h for h in self._by_pid.values() if h.exit_position is not None]
        if not waiting:
            return
        consumed = self._ring.consumer if self._ring is not None else 1 << 63
        read_lines()
        now = time.monotonic()
        for held in waiting:
            if self._by_pid.get(held.pid) is not held:
                continue  # told and let go meanwhile
            if consumed >= (held.exit_position or 0) or now - held.exited_at > MAX_WAIT_S:
                self._release(held)

    def _release(self, held: _Held) -> None:
        self._by_pid.pop(held.pid, None)
        self._by_pidfd.pop(held.pidfd, None)
        if held.exit_position is None:
            with contextlib.suppress(KeyError):
                self._poller.unregister(held.pidfd)
        os.close(held.fd)
        os.close(held.pidfd)

    def close(self) -> None:
        for held in list(self._by_pid.values()):
            self._release(held)
        if self._ring is not None:
            self._ring.close()


__all__ = ["HeldStderrs", "RingPositions"]


def may_be_killed(fd: int, checked: Checked, is_exec: bool) -> bool:
    """Whether the BPF programs may kill the opener next (so its stderr is worth holding):
    it execs what we could not judge, or opens untrusted ELF code that can be mapped (a
    shared object or executable: what ld.so, dlopen and ctypes open before mmap; an object
    file or core dump is only ever read)."""
    if is_exec:
        return checked.outcome == Outcome.UNDECIDED
    if checked.outcome != Outcome.UNTRUSTED or checked.kind != FileKind.ELF:
        return False
    try:
        return os.pread(fd, 2, 16) in (b"\x02\x00", b"\x03\x00")  # e_type ET_EXEC, ET_DYN
    except OSError:
        return False
