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
_PATH_ARG = {_SYS_OPEN: 0, _SYS_CREAT: 0, _SYS_OPENAT: 1, _SYS_OPENAT2: 1}
"""Which argument of each open-family syscall is its path."""
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


def _open_syscalls(tgid: int) -> list[tuple[int, list[int]]] | None:
    """(number, arguments) of each thread of `tgid` blocked in an open-family syscall; None
    when this cannot be told (another architecture, the task is gone)."""
    if platform.machine() != "x86_64":
        return None
    try:
        tids = os.listdir(f"/proc/{tgid}/task")
    except OSError:
        return None
    out = []
    for tid in tids:
        with contextlib.suppress(OSError, ValueError, IndexError):
            fields = Path(f"/proc/{tgid}/task/{tid}/syscall").read_text().split()
            if not fields or fields[0] in ("running", "-1"):
                continue
            nr, args = int(fields[0]), [int(a, 16) for a in fields[1:7]]
            if nr in _PATH_ARG:
                out.append((nr, args))
    return out


def opening_for_write(tgid: int, flags: int = _WRITE_FLAGS) -> bool | None:
    """Whether a thread of `tgid` is inside an open-family syscall with any of `flags` (write
    access or O_TRUNC by default); None when this cannot be told."""
    calls = _open_syscalls(tgid)
    if calls is None:
        return None
    return any((_open_flags(nr, args) or 0) & flags for nr, args in calls)


def opening_paths(tgid: int) -> list[bytes] | None:
    """The paths the threads of `tgid` are opening now (read from its memory: the opener is
    blocked in the syscall, and the tree cannot write another process's memory); None when
    this cannot be told. A path that cannot be read is b'' (no planned name matches it, so the
    file's identity decides)."""
    calls = _open_syscalls(tgid)
    if calls is None:
        return None
    try:
        mem = os.open(f"/proc/{tgid}/mem", os.O_RDONLY | os.O_CLOEXEC)
    except OSError:
        return None
    try:
        return [_read_string(mem, args[_PATH_ARG[nr]]) for nr, args in calls]
    finally:
        os.close(mem)


def _read_string(mem: int, address: int, limit: int = 4096) -> bytes:
    out = b""
    while len(out) < limit:
        chunk_size = 4096 - (address + len(out)) % 4096  # never across an unmapped page
        try:
            chunk = os.pread(mem, chunk_size, address + len(out))
        except (OSError, OverflowError):
            return b""
        if not chunk:
            return b""
        end = chunk.find(b"\0")
        if end >= 0:
            return out + chunk[:end]
        out += chunk
    return b""


__all__ = ["TRUNCATE", "opening_for_write", "opening_paths"]
