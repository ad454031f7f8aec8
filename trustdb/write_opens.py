"""Is a task blocked in a fanotify permission event opening its file for writing?

fanotify does not report the open flags. The opener is blocked inside its open syscall, so
/proc/<pid>/task/<tid>/syscall shows the syscall number and its arguments, saved registers
no other thread can change. openat2 passes its flags in memory (`struct open_how`), which
another thread can rewrite while the open waits here: the run's seccomp filter answers it
ENOSYS, so an openat2 that reaches us is treated as a write open. io_uring (its opens run in
kernel workers) and open_by_handle_at are denied by the same filter. Only x86_64 numbers are
known here.
"""

from __future__ import annotations

import contextlib
import os
import platform
from pathlib import Path

_SYS_OPEN, _SYS_CREAT, _SYS_OPENAT, _SYS_OPENAT2 = 2, 85, 257, 437
_WRITE_FLAGS = os.O_WRONLY | os.O_RDWR | os.O_TRUNC
TRUNCATE = os.O_TRUNC
"""O_RDONLY | O_TRUNC empties a file without taking write access before the permission
event: no lease test sees it, only the flags do."""


def _open_flags(nr: int, args: list[int]) -> int | None:
    if nr == _SYS_OPEN:
        return args[1]
    if nr == _SYS_CREAT:
        return os.O_WRONLY | os.O_CREAT | os.O_TRUNC
    if nr == _SYS_OPENAT:
        return args[2]
    if nr == _SYS_OPENAT2:
        return _WRITE_FLAGS  # its flags are in memory that can change: never believe them
    return None


def opening_for_write(tgid: int, flags: int = _WRITE_FLAGS) -> bool | None:
    """Whether a thread of `tgid` is inside an open-family syscall with any of `flags` (write
    access or O_TRUNC by default); None when this cannot be told (another architecture, the
    task is gone)."""
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
            opened = _open_flags(nr, args)
            if opened is not None and opened & flags:
                return True
    return False


__all__ = ["TRUNCATE", "opening_for_write"]
