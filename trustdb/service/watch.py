"""The live wake-up: inotify on the database directory, so a committed `trust`, `untrust` or
`import` reaches the kernel map within one main-loop turn instead of a polling interval.

LMDB writes a commit's pages and meta page with pwrite() (py-lmdb without writemap), which
inotify reports as IN_MODIFY of data.mdb; a database replaced by rename shows up as IN_MOVED_TO
or IN_CREATE. The watch only says "look": the mirror's refresh compares the generation, so a
spurious wake-up costs one read transaction, and a lost one is caught by the slow fallback check.
"""

from __future__ import annotations

import ctypes
from pathlib import Path

import inotify_simple
from inotify_simple import INotify, flags

# inotify_simple finds libc with ctypes.util.find_library on first use, which runs ldconfig and
# then gcc and objdump: execs the enforcing daemon must not make (and that the database need not
# trust). libc is mapped already: use it.
inotify_simple._libc = inotify_simple._libc or ctypes.CDLL(None, use_errno=True)  # type: ignore[attr-defined]

DATA_FILE = "data.mdb"
_MASK = flags.MODIFY | flags.CLOSE_WRITE | flags.MOVED_TO | flags.CREATE


class DatabaseWatch:
    def __init__(self, db_dir: Path) -> None:
        self._inotify = INotify()
        self._inotify.add_watch(str(db_dir), _MASK)

    def fileno(self) -> int:
        return self._inotify.fileno()

    def changed(self) -> bool:
        """Drain the queue; True if the data file (or the directory's entries) changed."""
        return any(ev.name in (DATA_FILE, "") for ev in self._inotify.read(timeout=0))

    def close(self) -> None:
        self._inotify.close()
