"""Read a file once and produce every digest a caller asked for (shared by all stages).

The file is opened with O_NONBLOCK and checked with fstat before any read, so a FIFO, socket or
device that slipped past a caller's lstat can never block us. The stat is taken before and after
the read: if size or ctime moved, the file changed under us and the digests mean nothing.
"""

from __future__ import annotations

import hashlib
import os
import stat as statmod
from dataclasses import dataclass

import blake3

from trustdb.model import FileDigests, FileKind, InodeKey

CHUNK = 1 << 20
"""Read size. blake3 releases the GIL for inputs this large, so threads hash in parallel."""

ELF_MAGIC = b"\x7fELF"


class HashingError(Exception):
    """A file could not be hashed; the message is one line naming the reason (not the path)."""


@dataclass(frozen=True, slots=True)
class HashedFile:
    digests: FileDigests
    stat: os.stat_result
    """fstat of the open file, taken before reading (identical after, or we raise)."""

    @property
    def inode(self) -> InodeKey:
        return InodeKey.from_stat(self.stat)


def classify(head: bytes, mode: int) -> FileKind:
    """Executable kind from the first bytes and the mode bits."""
    if head.startswith(ELF_MAGIC):
        return FileKind.ELF
    if head.startswith(b"#!"):
        return FileKind.SCRIPT
    if mode & 0o111:
        return FileKind.EXECUTABLE
    return FileKind.OTHER


def hash_file(
    path: str,
    *,
    follow_symlinks: bool = True,
    want_sha256: bool = False,
    want_md5: bool = False,
    dir_fd: int | None = None,
) -> HashedFile:
    """Hash a regular file in one pass. Raises HashingError for anything that is not one."""
    flags = os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC | os.O_NOCTTY
    if not follow_symlinks:
        flags |= os.O_NOFOLLOW
    try:
        fd = os.open(path, flags, dir_fd=dir_fd)
    except FileNotFoundError as e:
        raise HashingError("vanished (no such file)") from e
    except PermissionError as e:
        raise HashingError("unreadable (permission denied)") from e
    except OSError as e:
        raise HashingError(f"cannot open: {e.strerror}") from e
    try:
        return _hash_fd(fd, want_sha256=want_sha256, want_md5=want_md5)
    finally:
        os.close(fd)


def _hash_fd(fd: int, *, want_sha256: bool, want_md5: bool) -> HashedFile:
    before = os.fstat(fd)
    if not statmod.S_ISREG(before.st_mode):
        raise HashingError("not a regular file")
    b3 = blake3.blake3(max_threads=1)
    sha = hashlib.sha256() if want_sha256 else None
    md5 = hashlib.md5(usedforsecurity=False) if want_md5 else None
    head = b""
    size = 0
    try:
        while True:
            chunk = os.read(fd, CHUNK)
            if not chunk:
                break
            if not head:
                head = chunk[:4]
            size += len(chunk)
            b3.update(chunk)
            if sha is not None:
                sha.update(chunk)
            if md5 is not None:
                md5.update(chunk)
    except OSError as e:
        raise HashingError(f"read error: {e.strerror}") from e
    after = os.fstat(fd)
    if (
        size != before.st_size
        or after.st_size != before.st_size
        or after.st_ctime_ns != before.st_ctime_ns
        or after.st_mtime_ns != before.st_mtime_ns
    ):
        raise HashingError("changed while being hashed")
    digests = FileDigests(
        blake3=b3.digest(),
        size=size,
        kind=classify(head, before.st_mode),
        sha256=sha.digest() if sha is not None else None,
        md5=md5.digest() if md5 is not None else None,
    )
    return HashedFile(digests=digests, stat=before)


def hash_bytes(data: bytes) -> bytes:
    """BLAKE3-256 of an in-memory buffer (package payload members)."""
    return blake3.blake3(data).digest()
