"""The LMDB environment under the trust database: map sizing, the writers' lock, turning LMDB
errors into one-line DatabaseErrors, and the replay buffer for retried writes. `trustdb.db`
(TrustDB) is the only user; SCHEMA (trustdb.dbschema) describes the rules these implement."""

from __future__ import annotations

import fcntl
import os
import sys
import time
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path

import lmdb

from trustdb.dbrecords import BusyError, DatabaseError, DiskFullError
from trustdb.model import StreamItem

INITIAL_MAP_SIZE = 1 << 30
"""Starting map size: room for about a million entries. On Linux the file only takes the pages
it uses (the map is address space), and a full map means redoing the whole transaction."""


def _one_line(e: BaseException) -> str:
    return " ".join(str(e).split()) or type(e).__name__


def _disk_full(where: Path) -> bool:
    """LMDB turns a short write into EIO; a (nearly) full filesystem explains it."""
    try:
        st = os.statvfs(where)
    except OSError:
        return False
    return st.f_bavail * st.f_frsize < (1 << 20)


def translate(e: lmdb.Error, where: Path) -> DatabaseError:
    """Turn an LMDB failure into the stage's error type (one line)."""
    text = _one_line(e)
    if "No space left" in text or ("Input/output error" in text and _disk_full(where)):
        return DiskFullError(f"disk full writing {where}; nothing was changed")
    return DatabaseError(f"database {where}: {text}")



@contextmanager
def writer_lock(path: Path, busy_timeout: float) -> Iterator[None]:
    """The writers' flock on `path`/writer.lock, recording our pid and command (SCHEMA:
Writers). Raises BusyError naming the holder after `busy_timeout` seconds."""
    lock_path = path / "writer.lock"
    try:
        fd = os.open(lock_path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
    except OSError as e:
        raise DatabaseError(f"cannot open {lock_path}: {e.strerror}") from e
    try:
        deadline = time.monotonic() + busy_timeout
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() >= deadline:
                    holder = os.pread(fd, 200, 0).decode(errors="replace").strip()
                    raise BusyError(
                        f"another writer holds {path} ({holder or 'unknown'}); "
                        "try again when it has finished"
                    ) from None
                time.sleep(0.05)
        os.ftruncate(fd, 0)
        cmd = " ".join(os.path.basename(a) for a in sys.argv[:3])
        os.pwrite(fd, f"pid {os.getpid()}: {cmd}\n".encode(), 0)
        yield
    finally:
        os.close(fd)  # releases the flock


def map_size_for(path: Path) -> int:
    """Start with room to double: never below what the file already holds."""
    try:
        used = os.stat(path / "data.mdb").st_size
    except FileNotFoundError:
        used = 0
    return max(INITIAL_MAP_SIZE, 2 * used)


class Replayable:
    """Iterate a stream once while recording it, so a retried transaction sees the same items
    (for plain iterables; a callable ItemSource is asked again instead)."""

    def __init__(self, items: Iterable[tuple[StreamItem, float]]) -> None:
        self._source: Iterator[tuple[StreamItem, float]] | None = iter(items)
        self._seen: list[tuple[StreamItem, float]] = []

    def __iter__(self) -> Iterator[tuple[StreamItem, float]]:
        yield from self._seen
        if self._source is None:
            return
        for pair in self._source:
            self._seen.append(pair)
            yield pair
        self._source = None
