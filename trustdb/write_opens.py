"""Is a task blocked in a fanotify permission event opening its file for writing?

fanotify does not report the open flags. The opener is blocked inside its open syscall, so
/proc/<pid>/task/<tid>/syscall shows the syscall number and its arguments; openat2 passes a
pointer to `struct open_how`, whose first field (flags) is read from the task's memory. Only
x86_64 numbers are known here. io_uring opens do not show up this way (the run's seccomp
filter denies io_uring altogether).
"""

from __future__ import annotations

import contextlib
import os
import platform
import struct
from pathlib import Path

_SYS_OPEN, _SYS_CREAT, _SYS_OPENAT, _SYS_OPENAT2 = 2, 85, 257, 437
_WRITE_FLAGS = os.O_WRONLY | os.O_RDWR | os.O_TRUNC


def _open_flags(pid: int, nr: int, args: list[int]) -> int | None:
    if nr == _SYS_OPEN:
        return args[1]
    if nr == _SYS_CREAT:
        return os.O_WRONLY | os.O_CREAT | os.O_TRUNC
    if nr == _SYS_OPENAT:
        return args[2]
    if nr == _SYS_OPENAT2:
        try:
            fd = os.open(f"/proc/{pid}/mem", os.O_RDONLY | os.O_CLOEXEC)
        except OSError:
            return None
        try:
            raw = os.pread(fd, 8, args[2])
        except OSError:
            return None
        finally:
            os.close(fd)
        return struct.unpack("=Q", raw)[0] if len(raw) == 8 else None
    return None


def opening_for_write(tgid: int) -> bool | None:
    """Whether a thread of `tgid` is inside an open-family syscall with write access (or
    O_TRUNC); None when this cannot be told (another architecture, the task is gone)."""
    if platform.machine() != "x86_64":
        return None
    try:
        tids = os.listdir(f"/proc/{tgid}/task")
    except OSError:
        return None
    for tid in tids:
        with contextlib.suppress(OSError, ValueError, IndexError):
            fields = Path(f"/proc/{tgid}/task/{tid}/syscall").read_text().split()
            if not fields or fields[0] in ("running", "-1"):
                continue
            nr, args = int(fields[0]), [int(a, 16) for a in fields[1:7]]
            flags = _open_flags(int(tid), nr, args)
            if flags is not None and flags & _WRITE_FLAGS:
                return True
    return False


__all__ = ["opening_for_write"]
