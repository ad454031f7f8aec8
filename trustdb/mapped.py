"""Hash a large file from a read-only mapping: no copy into a buffer, b3sum's own method.

A mapped file that shrinks under its reader raises SIGBUS at the next access past the new end,
and so does a page the kernel cannot bring in (a disk error, a FUSE server that says no): either
would end the whole command. Both are ruled out before a page is touched:
- **A read lease.** The kernel grants it only while nobody has the file open for writing (a
  shared-writable mapping included), and from then on every write open and every truncate
  waits until we let go (or until /proc/sys/fs/lease-break-time passes). Before each window we
  ask whether a break is pending; if one is, we unmap, let go at once and read the rest.
- **mincore.** A window is hashed from the mapping only when all its pages are already in the
  page cache, so no fault of ours ever goes to a disk or a server; any other window is read with
  pread (a cold file is bound by the disk anyway, where mapping gains nothing).
- **Local filesystems only** (fstatfs): ext4, xfs, btrfs, tmpfs, whose page cache only the
  kernel fills.

A lease break sends its holder SIGIO, whose default action ends the process: mapping is used
only after `allow_mapping()` set SIGIO to ignored (from the main thread; nothing in trustdb
uses SIGIO). Everything else falls back to plain reads, with the same digests.
"""

from __future__ import annotations

import ctypes
import fcntl
import os
import signal
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager

WINDOW = 16 << 20
"""Bytes mapped and hashed per step (a multiple of the page size): large enough for blake3's
threads, small enough that a pending lease break is seen within milliseconds."""

MIN_SIZE = 1 << 20
"""Smaller files are read: a mapping costs about eight system calls, a copy of 1 MiB more."""

MIN_LEASE_BREAK_SECONDS = 5
"""Below this lease-break-time a slow window could outlast the lease: then we never map."""

_LOCAL_FILESYSTEMS = frozenset(
    {
        0xEF53,  # ext2/3/4
        0x58465342,  # xfs
        0x9123683E,  # btrfs
        0x01021994,  # tmpfs
    }
)

_PROT_READ = 1
_MAP_SHARED = 1
_MAP_FAILED = ctypes.c_void_p(-1).value
_PAGE = os.sysconf("SC_PAGE_SIZE")
_RESIDENT_BIT = bytes(b & 1 for b in range(256))
"""mincore's vector has one byte per page; only its lowest bit is defined (resident)."""

_libc = ctypes.CDLL(None, use_errno=True)
_libc.mmap.restype = ctypes.c_void_p
_libc.mmap.argtypes = [
    ctypes.c_void_p,
    ctypes.c_size_t,
    ctypes.c_int,
    ctypes.c_int,
    ctypes.c_int,
    ctypes.c_long,
]
_libc.munmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
_libc.mincore.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_char_p]
_libc.fstatfs.argtypes = [ctypes.c_int, ctypes.c_char_p]

_allowed = False

Update = Callable[[memoryview], object]
"""One hasher's update method (blake3, hashlib): each is fed every byte once, in order."""


def allow_mapping() -> bool:
    """Let this process hash from mappings from now on (see the module docstring): a worker
    process that only hashes. Call from the main thread of a process that does not use SIGIO;
    False if that cannot be arranged."""
    global _allowed
    if threading.current_thread() is not threading.main_thread():
        return _allowed
    if signal.getsignal(signal.SIGIO) not in (signal.SIG_DFL, signal.SIG_IGN):
        return False  # someone else's SIGIO handler: leave it alone
    signal.signal(signal.SIGIO, signal.SIG_IGN)
    _allowed = _lease_break_seconds() >= MIN_LEASE_BREAK_SECONDS
    return _allowed


@contextmanager
def mapping_allowed() -> Iterator[bool]:
    """`allow_mapping()` for the length of a `with` block, then SIGIO and mapping as they were:
    an ignored signal outlives exec, and the programs a caller runs later must not inherit it.
    The block must not leave hashing behind it (threads still running when it ends)."""
    global _allowed
    if threading.current_thread() is not threading.main_thread() or _allowed:
        yield _allowed  # already allowed (a worker), or not ours to change from here
        return
    before = signal.getsignal(signal.SIGIO)
    try:
        yield allow_mapping()
    finally:
        _allowed = False
        if before in (signal.SIG_DFL, signal.SIG_IGN):
            signal.signal(signal.SIGIO, before)


def _lease_break_seconds() -> int:
    try:
        with open("/proc/sys/fs/lease-break-time") as f:
            return int(f.read())
    except (OSError, ValueError):
        return 0


def hash_mapped(fd: int, size: int, updates: list[Update], buf: bytearray) -> int | None:
    """Feed the whole file to `updates`, from a mapping where that is safe, else by pread into
    `buf`. -> bytes fed, up to end of file; None when nothing was fed
    because the file cannot be mapped safely (the caller reads it the usual way)."""
    if not _allowed or size < MIN_SIZE or not _local(fd):
        return None
    # A caller's own lease (trustdb.service.closewrite) is kept: dropping it would let writers in.
    ours = fcntl.fcntl(fd, fcntl.F_GETLEASE) != fcntl.F_RDLCK
    if ours and not _take_lease(fd):
        return None
    try:
        if os.fstat(fd).st_size != size:
            return None  # it changed before the lease: never map past a new end (the read says)
        offset = _feed_mapped(fd, size, updates, buf)
    finally:
        if ours:
            _drop_lease(fd)
    return offset + _feed_read(fd, offset, updates, buf)


def _feed_mapped(fd: int, size: int, updates: list[Update], buf: bytearray) -> int:
    """Windows in order while the lease holds, each mapped on its own (memory stays at one
    window whatever the file's size). -> where the lease broke (or `size`)."""
    vec = ctypes.create_string_buffer(WINDOW // _PAGE + 1)
    offset = 0
    while offset < size:
        if fcntl.fcntl(fd, fcntl.F_GETLEASE) != fcntl.F_RDLCK:
            return offset  # a writer waits for us: stop touching the file's pages now
        n = min(WINDOW, size - offset)
        addr = _libc.mmap(None, n, _PROT_READ, _MAP_SHARED, fd, offset)
        if addr is None or addr == _MAP_FAILED:
            return offset  # the rest is read
        try:
            if _resident(addr, n, vec):
                view = memoryview((ctypes.c_ubyte * n).from_address(addr)).cast("B")
                for update in updates:
                    update(view)
                view.release()
            elif (got := _feed_range(fd, offset, n, updates, buf)) != n:
                return offset + got  # cannot shrink under a lease; the size check will say so
        finally:
            _libc.munmap(addr, n)
        offset += n
    return offset


def _feed_range(fd: int, offset: int, length: int, updates: list[Update], buf: bytearray) -> int:
    """`length` bytes from `offset` by pread, `buf` at a time. -> bytes fed (less at EOF)."""
    view = memoryview(buf)
    fed = 0
    while fed < length and (
        n := os.preadv(fd, [view[: min(len(buf), length - fed)]], offset + fed)
    ):
        for update in updates:
            update(view[:n])
        fed += n
    return fed


def _feed_read(fd: int, offset: int, updates: list[Update], buf: bytearray) -> int:
    """The rest of the file from `offset`, to its end (after a lease break). -> bytes fed."""
    return _feed_range(fd, offset, 1 << 62, updates, buf)


def _resident(addr: int, length: int, vec: ctypes.Array[ctypes.c_char]) -> bool:
    if _libc.mincore(addr, length, vec) != 0:
        return False
    pages = (length + _PAGE - 1) // _PAGE
    return b"\0" not in vec.raw[:pages].translate(_RESIDENT_BIT)


def _local(fd: int) -> bool:
    out = ctypes.create_string_buffer(128)  # struct statfs; f_type is its first word
    if _libc.fstatfs(fd, out) != 0:
        return False
    return int.from_bytes(out.raw[:8], "little", signed=True) in _LOCAL_FILESYSTEMS


def _take_lease(fd: int) -> bool:
    try:
        fcntl.fcntl(fd, fcntl.F_SETLEASE, fcntl.F_RDLCK)
    except OSError:
        return False  # EAGAIN: a writer is there; EACCES: not ours; EINVAL: no leases here
    return True


def _drop_lease(fd: int) -> None:
    try:
        fcntl.fcntl(fd, fcntl.F_SETLEASE, fcntl.F_UNLCK)
    except OSError:
        pass
