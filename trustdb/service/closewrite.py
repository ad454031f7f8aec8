"""Close-after-write events of trusted writers: the content they closed, and nothing else's.

One pass (`ClosedFiles.collect`) over a notification group's queue:
1. the last close-write of each inode wins (a later close by another writer supersedes an
   earlier trusted one);
2. for each inode whose last writer is trusted, a read lease on the event's fd: the kernel grants
   `F_RDLCK` only while no one has the file open for writing (an fd, or a writable shared
   mapping, which holds one), and from then on an open for writing waits for the lease to go;
3. the queue is drained again with the leases held: every writer that closed before the lease
   has queued its close-write by then (the kernel queues the event in __fput before it drops the
   file's write access), so a close by anyone else since supersedes the trusted one;
4. the content is hashed from the leased fd: what the trusted writer wrote, with no writer left.
"""

from __future__ import annotations

import fcntl
import os
import signal
import sys
from collections.abc import Callable, Iterable
from dataclasses import dataclass

from trustdb.fanotify import FAN_NOFD, Event
from trustdb.hashing import HashingError, NotExecutable, hash_fd
from trustdb.model import FileKind, TrustEntry
from trustdb.service.hostns import host_writer_file

FAN_CLOSE_WRITE = 0x08


@dataclass(frozen=True, slots=True)
class Writer:
    """Who closed a file, as far as trust goes: the source it goes to and its provenance."""

    source: str
    """The database source, e.g. `installer:dpkg` or `built:ld`."""
    kind: str
    origin: str
    """e.g. `installed-by:dpkg`, `built-by:ld`."""
    elf_only: bool = False
    """A compiler's outputs count only as ELF objects: `gcc -E -o out` of a payload, or a
    `#!` text, written by a trusted cc must not become trusted code for an interpreter."""


TRACE = os.environ.get("TRUSTDB_TRACE_CLOSE_WRITES") == "1"
"""A line per close-write on stderr (the journal): for debugging a window, off by default."""


def _trace(line: str) -> None:
    if TRACE:
        print(f"trustdb: close-write: {line}", file=sys.stderr, flush=True)


def _path_of(fd: int) -> str:
    try:
        return os.readlink(f"/proc/self/fd/{fd}")
    except OSError:
        return f"fd {fd}"


def ignore_lease_breaks() -> None:
    """A lease break sends the holder SIGIO, whose default action ends the process. The daemon
    drops each lease within one pass, so it needs no notice."""
    signal.signal(signal.SIGIO, signal.SIG_IGN)


def take_read_lease(fd: int) -> bool:
    """True when no one has the file open for writing (and new writers now wait for us)."""
    try:
        fcntl.fcntl(fd, fcntl.F_SETLEASE, fcntl.F_RDLCK)
    except OSError:
        return False  # EAGAIN: a writer is left; EINVAL: no leases on this filesystem
    return True


def holds_read_lease(fd: int) -> bool:
    """False once a break started (a writer waits, and gets in when lease-break-time ends)."""
    try:
        return fcntl.fcntl(fd, fcntl.F_GETLEASE) == fcntl.F_RDLCK
    except OSError:
        return False


class ClosedFiles:
    """Fold close-write events into (writer, leased fd) per inode; see the module's steps."""

    def __init__(self, read: Callable[[], list[Event]],
                 writer_of: Callable[[int], Writer | None],
                 on_other: Callable[[Event], None]) -> None:
        self._read = read
        self._writer_of = writer_of
        self._on_other = on_other  # events that are not close-writes (exec events)

    def collect(self) -> list[tuple[Writer, TrustEntry]]:
        pending: dict[tuple[int, int], tuple[Writer | None, int]] = {}
        leased: set[tuple[int, int]] = set()
        try:
            while True:
                events = self._read()
                if not events:
                    break
                self._fold(events, pending, leased)
                for ident, (writer, fd) in list(pending.items()):
                    if ident in leased:
                        continue
                    if writer is None or not take_read_lease(fd):
                        if writer is not None:
                            _trace(f"no lease on {_path_of(fd)}: a writer is left")
                        del pending[ident]
                        os.close(fd)
                    else:
                        leased.add(ident)
            return [found for writer, fd in pending.values() if writer is not None
                    for found in self._hashed(writer, fd)]
        finally:
            for _, fd in pending.values():
                os.close(fd)  # closing the fd ends its lease

    def _fold(self, events: Iterable[Event], pending: dict[tuple[int, int], tuple[Writer | None, int]],
              leased: set[tuple[int, int]]) -> None:
        for ev in events:
            if ev.fd == FAN_NOFD:
                continue  # queue overflow: what was lost stays untrusted
            if not ev.mask & FAN_CLOSE_WRITE:
                try:
                    self._on_other(ev)
                finally:
                    os.close(ev.fd)
                continue
            try:
                st = os.fstat(ev.fd)
            except OSError:
                os.close(ev.fd)
                continue
            ident = (st.st_dev, st.st_ino)
            earlier = pending.pop(ident, None)
            if earlier is not None:
                os.close(earlier[1])
                leased.discard(ident)
            writer = self._writer_of(ev.pid) if host_writer_file(ev.fd, ev.pid) else None
            pending[ident] = (writer, ev.fd)
            if pending[ident][0] is not None:
                _trace(f"close-write of {_path_of(ev.fd)} by pid {ev.pid}: {pending[ident][0].source}")

    @staticmethod
    def _hashed(writer: Writer, fd: int) -> list[tuple[Writer, TrustEntry]]:
        try:
            # Metadata may move while we read (dpkg and rpm rename, chmod and set the mtime of
            # what they closed, racing us): the lease, not the ctime, says the bytes held still.
            hashed = hash_fd(fd, executable_only=True, leased=True)
            if not holds_read_lease(fd):
                raise HashingError("a writer broke the lease while it was hashed")
            path = os.readlink(f"/proc/self/fd/{fd}")
        except (NotExecutable, HashingError, OSError) as e:
            _trace(f"{_path_of(fd)} not recorded: {e}")
            return []
        if not path.startswith("/") or path.endswith(" (deleted)"):
            return []
        d = hashed.digests
        if writer.elf_only and d.kind != FileKind.ELF:
            return []
        return [(writer, TrustEntry(path=path, digest=d.blake3, size=d.size, kind=d.kind,
                                    origin=writer.origin))]
