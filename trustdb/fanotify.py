"""The one ctypes module for fanotify: init, marks, events, answers. No policy lives here (the
first-seen handler that uses it is trustdb.first_seen).

Two kinds of group are used:
- a *permission* group (FAN_CLASS_CONTENT): FAN_OPEN_EXEC_PERM / FAN_OPEN_PERM events block the
  opener until we answer FAN_ALLOW or FAN_DENY (the open then fails with EPERM);
- a *notification* group in FID mode (FAN_REPORT_FID): FAN_ATTRIB / FAN_MOVE_SELF, which a
  plain group cannot receive, tell us that an inode's ctime moved without its content changing.
Every fd an event carries is opened by the kernel with FMODE_NONOTIFY: reading it raises no
event, so a handler must only ever look at files through those fds.
"""

from __future__ import annotations

import ctypes
import os
import struct
from collections.abc import Iterator
from dataclasses import dataclass

from trustdb.backends.interface import BackendError

# fanotify_init flags
FAN_CLOEXEC = 0x01
FAN_NONBLOCK = 0x02
FAN_CLASS_NOTIF = 0x00
FAN_CLASS_CONTENT = 0x04
FAN_UNLIMITED_QUEUE = 0x10
FAN_UNLIMITED_MARKS = 0x20
FAN_REPORT_TID = 0x100
FAN_REPORT_FID = 0x200

# fanotify_mark flags
FAN_MARK_ADD = 0x01
FAN_MARK_REMOVE = 0x02
FAN_MARK_FLUSH = 0x80
FAN_MARK_DONT_FOLLOW = 0x04
FAN_MARK_IGNORED_MASK = 0x20
FAN_MARK_INODE = 0x00
FAN_MARK_MOUNT = 0x10
FAN_MARK_FILESYSTEM = 0x100

# events
FAN_MODIFY = 0x02
FAN_ATTRIB = 0x04
FAN_MOVE_SELF = 0x800
FAN_DELETE_SELF = 0x400
FAN_OPEN_PERM = 0x00010000
FAN_OPEN_EXEC_PERM = 0x00040000
FAN_Q_OVERFLOW = 0x4000

# answers
FAN_ALLOW = 0x01
FAN_DENY = 0x02
FAN_NOFD = -1

_AT_FDCWD = -100
_EVENT_F_FLAGS = os.O_RDONLY | 0o100000 | os.O_CLOEXEC | os.O_NONBLOCK
"""How the kernel opens each event's fd: O_LARGEFILE, and O_NONBLOCK so that a FIFO never
blocks the handler."""

_META = struct.Struct("=IBBHQii")  # struct fanotify_event_metadata (24 bytes)
_RESPONSE = struct.Struct("=iI")  # struct fanotify_response

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

    def __init__(self, message: str, errno: int = 0) -> None:
        super().__init__(message)
        self.errno = errno


def _oserror(what: str) -> FanotifyError:
    err = ctypes.get_errno()
    return FanotifyError(f"{what}: {os.strerror(err)}", err)


@dataclass(frozen=True, slots=True)
class Event:
    mask: int
    fd: int
    """An fd of the file (FAN_NOFD on queue overflow and in FID mode); the caller closes it."""
    pid: int
    """The opener's tgid (its tid with FAN_REPORT_TID), in the listener's pid namespace."""


class Fanotify:
    """One fanotify group. Closing its fd (or the process dying) makes the kernel allow every
    pending and later permission event: fanotify alone fails open."""

    def __init__(self, flags: int = FAN_CLASS_CONTENT | FAN_CLOEXEC) -> None:
        fd = _libc.fanotify_init(flags, _EVENT_F_FLAGS)
        if fd < 0:
            raise _oserror("fanotify_init")
        self.fd: int = fd

    @classmethod
    def permission(cls) -> Fanotify:
        """A blocking-answer group with room for as many ignore marks as files get verified."""
        return cls(FAN_CLASS_CONTENT | FAN_CLOEXEC | FAN_UNLIMITED_QUEUE | FAN_UNLIMITED_MARKS)

    @classmethod
    def inode_changes(cls) -> Fanotify:
        """A notification group in FID mode (FAN_ATTRIB and FAN_MOVE_SELF need it)."""
        return cls(FAN_CLASS_NOTIF | FAN_CLOEXEC | FAN_NONBLOCK | FAN_REPORT_FID
                   | FAN_UNLIMITED_QUEUE | FAN_UNLIMITED_MARKS)

    def _mark(self, flags: int, mask: int, dirfd: int, path: str | None, what: str) -> None:
        if _libc.fanotify_mark(self.fd, flags, mask, dirfd,
                               None if path is None else os.fsencode(path)):
            raise _oserror(f"fanotify_mark {what}")

    def mark_mount(self, path: str, mask: int) -> None:
        """Watch the one mount `path` is on (not other mounts of the same filesystem)."""
        self._mark(FAN_MARK_ADD | FAN_MARK_MOUNT, mask, _AT_FDCWD, path, path)

    def mark_filesystem(self, path: str, mask: int) -> None:
        """Watch the whole filesystem `path` is on (every mount of it, in every namespace)."""
        self._mark(FAN_MARK_ADD | FAN_MARK_FILESYSTEM, mask, _AT_FDCWD, path, path)

    def mark_inode_fd(self, fd: int, mask: int) -> None:
        """Watch the inode behind `fd` (an event fd: no path is resolved, nothing is opened)."""
        self._mark(FAN_MARK_ADD | FAN_MARK_INODE, mask, fd, None, f"fd {fd}")

    def ignore_inode_fd(self, fd: int, mask: int) -> None:
        """Stop reporting `mask` for the inode behind `fd`, whatever mount it is opened through,
        until its content is modified (the kernel clears the ignore mask on FAN_MODIFY)."""
        self._mark(FAN_MARK_ADD | FAN_MARK_INODE | FAN_MARK_IGNORED_MASK, mask, fd, None,
                   f"ignore fd {fd}")

    def flush_inode_marks(self) -> None:
        """Remove every inode mark (and ignore mark) of this group; mount marks stay."""
        self._mark(FAN_MARK_FLUSH, 0, _AT_FDCWD, None, "flush")

    def flush_filesystem_marks(self) -> None:
        """Remove every filesystem mark of this group (the service's installer window)."""
        self._mark(FAN_MARK_FLUSH | FAN_MARK_FILESYSTEM, 0, _AT_FDCWD, None, "flush filesystems")

    def read(self, bufsize: int = 8192) -> Iterator[Event]:
        """The events waiting (non-blocking groups: none when the queue is empty)."""
        try:
            buf = os.read(self.fd, bufsize)
        except BlockingIOError:
            return
        off = 0
        while off + _META.size <= len(buf):
            event_len, _vers, _res, _mlen, mask, fd, pid = _META.unpack_from(buf, off)
            yield Event(mask, fd, pid)
            off += event_len

    def respond(self, fd: int, allow: bool = True) -> None:
        os.write(self.fd, _RESPONSE.pack(fd, FAN_ALLOW if allow else FAN_DENY))

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1


# --- pidfd_getfd: the handler writes a denial into the blocked task's own stderr ------------

_SYS_PIDFD_GETFD = 438


def pidfd_getfd(pidfd: int, targetfd: int) -> int:
    """A duplicate of another process's fd (the file itself, not a re-open: no fanotify event,
    no path lookup in the confined tree's namespace)."""
    fd = _libc.syscall(_SYS_PIDFD_GETFD, ctypes.c_int(pidfd), ctypes.c_int(targetfd),
                       ctypes.c_uint(0))
    if fd < 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))
    return int(fd)


__all__ = [
    "FAN_ALLOW",
    "FAN_ATTRIB",
    "FAN_DENY",
    "FAN_MOVE_SELF",
    "FAN_OPEN_EXEC_PERM",
    "FAN_OPEN_PERM",
    "Event",
    "Fanotify",
    "FanotifyError",
    "pidfd_getfd",
]
