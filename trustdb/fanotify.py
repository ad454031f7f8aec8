"""The one ctypes module for fanotify, and the exec pre-warm built on it.

The kernel map is keyed by inode version (dev, ino, ctime), so a copy of a trusted binary, or a
trusted binary after chmod, misses in the kernel although its content is trusted. fanotify's
FAN_OPEN_EXEC_PERM event is delivered while the exec is blocked opening the file, before the
BPF exec check runs: the handler hashes the file (the mirror's `verify_file`) and inserts its
key if the content is trusted, then lets the open go on. The BPF programs still decide:
**the answer to fanotify is always FAN_ALLOW** (fanotify fails open when its listener dies, so it
must never be what denies). Limits:
- only exec opens are pre-warmed; a copied *shared library* is opened with a plain open(), and
  watching every open on the machine would tax everything, so it is denied until `trustdb`
  re-syncs (the mirror's refresh);
- memfd files cannot be marked (an fexecve of a memfd copy stays denied);
- while the pre-warm runs, every exec on the marked filesystems waits for this handler (about
  0.2 ms), confined or not; events from unconfined processes are answered at once.
The handler runs on its own thread. CPython before 3.11.4 can deadlock a thread like this one
when another thread of the process fork+execs (gh-104372), so older interpreters are refused.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import select
import struct
import sys
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass

from trustdb.backends.interface import Backend, BackendError, Scope
from trustdb.model import InodeKey

FAN_CLOEXEC = 0x01
FAN_NONBLOCK = 0x02
FAN_CLASS_CONTENT = 0x04
FAN_UNLIMITED_QUEUE = 0x10
FAN_MARK_ADD = 0x01
FAN_MARK_FILESYSTEM = 0x100
FAN_OPEN_PERM = 0x00010000
FAN_OPEN_EXEC_PERM = 0x00040000
FAN_ALLOW = 0x01
FAN_NOFD = -1
_AT_FDCWD = -100
_O_RDONLY = os.O_RDONLY
_O_LARGEFILE = 0o100000

_META = struct.Struct("=IBBHQii")  # struct fanotify_event_metadata (24 bytes)
_RESPONSE = struct.Struct("=iI")  # struct fanotify_response

# Filesystems nobody executes from (or that cannot be marked).
_SKIP_FSTYPES = frozenset(
    [
        "proc",
        "sysfs",
        "cgroup",
        "cgroup2",
        "devpts",
        "tracefs",
        "debugfs",
        "securityfs",
        "bpf",
        "mqueue",
        "pstore",
        "configfs",
        "fusectl",
        "hugetlbfs",
        "autofs",
        "binfmt_misc",
        "efivarfs",
        "rpc_pipefs",
        "nsfs",
        "devtmpfs",
    ]
)

_libc = ctypes.CDLL(None, use_errno=True)
_libc.fanotify_init.argtypes = [ctypes.c_uint, ctypes.c_uint]
_libc.fanotify_init.restype = ctypes.c_int
_libc.fanotify_mark.argtypes = [
    ctypes.c_int,
    ctypes.c_uint,
    ctypes.c_uint64,
    ctypes.c_int,
    ctypes.c_char_p,
]
_libc.fanotify_mark.restype = ctypes.c_int


class FanotifyError(BackendError):
    """fanotify refused something (one line, with the errno text)."""


def _oserror(what: str) -> FanotifyError:
    err = ctypes.get_errno()
    return FanotifyError(f"{what}: {os.strerror(err)}")


@dataclass(frozen=True, slots=True)
class Event:
    mask: int
    fd: int
    """An fd of the file being opened (FAN_NOFD on queue overflow); the caller closes it."""
    pid: int


class Fanotify:
    """A fanotify group: init, mark, read events, respond. Closes its fd on close()."""

    def __init__(self, flags: int = FAN_CLASS_CONTENT | FAN_CLOEXEC) -> None:
        fd = _libc.fanotify_init(flags, _O_RDONLY | _O_LARGEFILE | os.O_CLOEXEC)
        if fd < 0:
            raise _oserror("fanotify_init")
        self.fd: int = fd

    def mark_filesystem(self, path: str, mask: int) -> None:
        """Watch the whole filesystem `path` is on (every mount of it, in every namespace)."""
        if _libc.fanotify_mark(
            self.fd, FAN_MARK_ADD | FAN_MARK_FILESYSTEM, mask, _AT_FDCWD, os.fsencode(path)
        ):
            raise _oserror(f"fanotify_mark {path}")

    def read(self, bufsize: int = 4096) -> Iterator[Event]:
        buf = os.read(self.fd, bufsize)
        off = 0
        while off + _META.size <= len(buf):
            event_len, _vers, _res, _mlen, mask, fd, pid = _META.unpack_from(buf, off)
            yield Event(mask, fd, pid)
            off += event_len

    def respond(self, fd: int, response: int = FAN_ALLOW) -> None:
        os.write(self.fd, _RESPONSE.pack(fd, response))

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1


def exec_filesystems(mountinfo: str = "/proc/self/mountinfo") -> list[str]:
    """One mount point per filesystem that programs can be executed from."""
    seen: set[int] = set()
    out: list[str] = []
    with open(mountinfo) as f:
        for line in f:
            fields = line.split()
            sep = fields.index("-")
            fstype, mnt = fields[sep + 1], fields[4].replace("\\040", " ")
            if fstype in _SKIP_FSTYPES or "noexec" in fields[5].split(","):
                continue
            try:
                dev = os.stat(mnt).st_dev
            except OSError:
                continue
            if dev not in seen:
                seen.add(dev)
                out.append(mnt)
    return out


class ExecPrewarmer:
    """Pre-warms the kernel map for files about to be executed by confined tasks."""

    def __init__(
        self,
        prewarm: Callable[[str | int], InodeKey | None],
        backend: Backend,
        *,
        scope: Scope,
        filesystems: list[str] | None = None,
    ) -> None:
        if sys.version_info < (3, 11, 4):
            raise FanotifyError(
                "the exec pre-warm needs Python >= 3.11.4 (CPython gh-104372 can deadlock it)"
            )
        self._prewarm = prewarm
        self._backend = backend
        self._system_wide = scope.system_wide
        self._filesystems = filesystems
        self._fan: Fanotify | None = None
        self._thread: threading.Thread | None = None
        self._stop_r, self._stop_w = os.pipe2(os.O_CLOEXEC)
        self.prewarmed = 0
        """Files whose keys the callback inserted (for tests and `status`)."""
        self.errors: list[str] = []

    def start(self) -> None:
        fan = Fanotify()
        try:
            for fs in self._filesystems or exec_filesystems():
                with contextlib.suppress(FanotifyError):  # e.g. a filesystem without fsid
                    fan.mark_filesystem(fs, FAN_OPEN_EXEC_PERM)
        except BaseException:
            fan.close()
            raise
        self._fan = fan
        self._thread = threading.Thread(target=self._loop, name="trustdb-prewarm", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        """Stop answering; the kernel allows pending and later events once the fd is closed."""
        if self._thread is not None:
            os.write(self._stop_w, b"x")
            self._thread.join()
            self._thread = None
        if self._fan is not None:
            self._fan.close()
            self._fan = None
        for fd in (self._stop_r, self._stop_w):
            with contextlib.suppress(OSError):
                os.close(fd)
        self._stop_r = self._stop_w = -1

    def _loop(self) -> None:
        fan = self._fan
        assert fan is not None
        poller = select.poll()
        poller.register(fan.fd, select.POLLIN)
        poller.register(self._stop_r, select.POLLIN)
        while True:
            ready = {fd for fd, _ in poller.poll()}
            if self._stop_r in ready:
                return
            for ev in fan.read():
                try:
                    if ev.fd != FAN_NOFD:
                        self._handle(ev)
                except Exception as e:  # noqa: BLE001 - never leave an exec waiting
                    self.errors.append(f"pre-warm: {e}")
                finally:
                    if ev.fd != FAN_NOFD:
                        fan.respond(ev.fd, FAN_ALLOW)
                        os.close(ev.fd)

    def _handle(self, ev: Event) -> None:
        if ev.pid == os.getpid() or not self._confined(ev.pid):
            return
        key = InodeKey.from_stat(os.fstat(ev.fd))
        contains = getattr(self._backend.trusted_inodes, "__contains__", None)
        if contains is not None and contains(key):
            return  # the kernel knows this one
        if self._prewarm(ev.fd) is not None:
            self.prewarmed += 1

    def _confined(self, pid: int) -> bool:
        if self._system_wide:
            return True
        is_confined = getattr(self._backend, "is_confined", None)
        if is_confined is None:
            return True  # cannot tell: pre-warm (costs time, never correctness)
        try:
            pidfd = os.pidfd_open(pid)
        except OSError:
            return False
        try:
            return bool(is_confined(pidfd))
        finally:
            os.close(pidfd)
