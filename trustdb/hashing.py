"""Read a file once and produce every digest a caller asked for (shared by all stages).

The file is opened with O_NONBLOCK and checked with fstat before any read, so a FIFO, socket or
device that slipped past a caller's lstat can never block us. The stat is taken before and after
the read: if size or ctime moved, the file changed under us and the digests mean nothing.
"""

from __future__ import annotations

import hashlib
import os
import stat as statmod
import time
from collections import deque
from collections.abc import Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass

import blake3

from trustdb.mapped import Update, hash_mapped
from trustdb.model import FileDigests, FileKind, InodeKey

CHUNK = 1 << 20
"""Read size for large files. blake3 releases the GIL for inputs this large, so threads hash in
parallel."""

SMALL_FILE = 1 << 20
"""Files up to this size are read with one read() of exactly their size (+1 to see growth)."""

HUGE_FILE = 64 << 20
"""Files this large are also hashed with blake3's own threads."""

BATCH = 64
"""Files per thread-pool task in hash_many."""

ELF_MAGIC = b"\x7fELF"

FRESH_CTIME_SECONDS = 0.05
"""A verification of a file whose ctime is this close to the start of the read must not be
cached under its inode key: on kernels with coarse ctime, a write in the same clock tick keeps
the ctime, so the key would outlive the content."""


class HashingError(Exception):
    """A file could not be hashed; the message is one line naming the reason (not the path)."""


class NotExecutable(HashingError):
    """With executable_only: the file holds no executable content, so it was not read."""


@dataclass(frozen=True, slots=True)
class HashedFile:
    digests: FileDigests
    stat: os.stat_result
    """fstat of the open file, taken before reading (identical after, or we raise)."""
    hashed_at: float = 0.0
    """Unix time just before the read began (see FRESH_CTIME_SECONDS)."""

    @property
    def cacheable(self) -> bool:
        """Whether the inode key may stand for this content later (see FRESH_CTIME_SECONDS)."""
        return self.hashed_at - self.stat.st_ctime_ns / 1e9 >= FRESH_CTIME_SECONDS

    @property
    def inode(self) -> InodeKey:
        return InodeKey.from_stat(self.stat)


SCRIPT_EXTENSIONS = (
    ".py",
    ".pyc",
    ".pyw",
    ".pl",
    ".pm",
    ".rb",
    ".sh",
    ".bash",
    ".js",
    ".mjs",
    ".cjs",
    ".lua",
    ".php",
    ".tcl",
    ".pth",
)
"""Names of script content an interpreter loads (FileKind.SCRIPT_SOURCE)."""


def is_script_name(name: str) -> bool:
    return name.endswith(SCRIPT_EXTENSIONS)


def classify(head: bytes, mode: int, name: str | None = None) -> FileKind:
    """Executable kind from the first bytes, the mode bits and (for script sources) the name."""
    if head.startswith(ELF_MAGIC):
        return FileKind.ELF
    if head.startswith(b"#!"):
        return FileKind.SCRIPT
    if mode & 0o111:
        return FileKind.EXECUTABLE
    if name is not None and name.endswith(SCRIPT_EXTENSIONS):
        return FileKind.SCRIPT_SOURCE
    return FileKind.OTHER


def with_name(kind: FileKind, name: str) -> FileKind:
    """A kind found without the file's name (a cached verification), completed by the name."""
    if kind is FileKind.OTHER and name.endswith(SCRIPT_EXTENSIONS):
        return FileKind.SCRIPT_SOURCE
    return kind


def hash_file(
    path: str,
    *,
    follow_symlinks: bool = True,
    want_sha256: bool = False,
    want_md5: bool = False,
    dir_fd: int | None = None,
    executable_only: bool = False,
    threads: bool = True,
) -> HashedFile:
    """Hash a regular file in one pass. Raises HashingError for anything that is not one.

    With executable_only, a file without an exec bit is classified from its first 4 bytes and,
    if it is neither ELF nor `#!`, not read further (NotExecutable): `trustdb trust` skips
    most of /usr/share this way."""
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
        return hash_fd(
            fd,
            want_sha256=want_sha256,
            want_md5=want_md5,
            executable_only=executable_only,
            name=path,
            threads=threads,
        )
    finally:
        os.close(fd)


def hash_fd(
    fd: int,
    *,
    want_sha256: bool = False,
    want_md5: bool = False,
    executable_only: bool = False,
    name: str | None = None,
    threads: bool = True,
    leased: bool = False,
) -> HashedFile:
    """Hash an already open file (the fanotify event's fd: reopening its path would raise a new
    permission event). Reads from the fd's current offset, so pass a fresh fd; the caller keeps
    ownership of it. `name` (the path, if known) lets script sources be classified as such.
    `threads=False` keeps blake3 on this thread even for a huge file (a forked hashing worker:
    blake3's thread pool does not survive a fork, see trustdb.hashpool).
    `leased`: the caller holds a read lease on `fd` (trustdb.service.closewrite), so the content
    cannot change while it lasts (a write open or truncate waits for it); a ctime or mtime that
    moves meanwhile is metadata (a package manager renames, chmods and sets the mtime of the
    file it just closed), and only the size is compared. The caller checks the lease held."""
    started = time.time()
    before = os.fstat(fd)
    if not statmod.S_ISREG(before.st_mode):
        raise HashingError("not a regular file")
    try:
        if executable_only and classify(os.pread(fd, 4, 0), before.st_mode, name) == FileKind.OTHER:
            raise NotExecutable("not executable content")
        if before.st_size <= SMALL_FILE:
            digests, size = _hash_small(
                fd, before, name, want_sha256=want_sha256, want_md5=want_md5
            )
        else:
            digests, size = _hash_large(
                fd, before, name, want_sha256=want_sha256, want_md5=want_md5, threads=threads
            )
    except OSError as e:
        raise HashingError(f"read error: {e.strerror}") from e
    after = os.fstat(fd)
    if (
        size != before.st_size
        or after.st_size != before.st_size
        or (not leased and after.st_ctime_ns != before.st_ctime_ns)
        or (not leased and after.st_mtime_ns != before.st_mtime_ns)
    ):
        raise HashingError("changed while being hashed")
    return HashedFile(digests=digests, stat=before, hashed_at=started)


def _hash_small(
    fd: int, st: os.stat_result, name: str | None, *, want_sha256: bool, want_md5: bool
) -> tuple[FileDigests, int]:
    """One read() of size+1 bytes: a short or long result means the file changed. Sized reads
    matter: a fixed 1 MiB read would allocate (and mmap/munmap) a 1 MiB buffer per file."""
    data = os.read(fd, st.st_size + 1)
    digests = FileDigests(
        blake3=blake3.blake3(data).digest(),
        size=len(data),
        kind=classify(data[:4], st.st_mode, name),
        sha256=hashlib.sha256(data).digest() if want_sha256 else None,
        md5=hashlib.md5(data, usedforsecurity=False).digest() if want_md5 else None,
    )
    return digests, len(data)


def _hash_large(
    fd: int,
    st: os.stat_result,
    name: str | None,
    *,
    want_sha256: bool,
    want_md5: bool,
    threads: bool = True,
) -> tuple[FileDigests, int]:
    """From a mapping where that is safe (`trustdb.mapped`: no copy), else chunked reads into
    one reused buffer; every hasher releases the GIL on chunks this big. A very large file also
    lets blake3 use its own threads (it still reads the file once)."""
    threaded = threads and st.st_size >= HUGE_FILE
    if threaded:
        _note_threads()
    b3 = blake3.blake3(max_threads=blake3.blake3.AUTO if threaded else 1)
    sha = hashlib.sha256() if want_sha256 else None
    md5 = hashlib.md5(usedforsecurity=False) if want_md5 else None
    head = bytearray()

    def keep_head(chunk: memoryview) -> None:  # the kind comes from the bytes hashed
        if len(head) < 4:
            head.extend(chunk[: 4 - len(head)])

    updates: list[Update] = [keep_head] + [h.update for h in (b3, sha, md5) if h is not None]
    buf = bytearray(CHUNK)
    size = hash_mapped(fd, st.st_size, updates, buf)
    if size is None:
        size = _feed_reads(fd, updates, buf)
    digests = FileDigests(
        blake3=b3.digest(),
        size=size,
        kind=classify(bytes(head), st.st_mode, name),
        sha256=sha.digest() if sha is not None else None,
        md5=md5.digest() if md5 is not None else None,
    )
    return digests, size


def _feed_reads(fd: int, updates: list[Update], buf: bytearray) -> int:
    """Read to the end of the file, `buf` at a time. -> bytes read."""
    view = memoryview(buf)
    size = 0
    while n := os.readv(fd, [buf]):
        chunk = view[:n]
        for update in updates:
            update(chunk)
        size += n
    return size


_threads_started = False


def _note_threads() -> None:
    global _threads_started
    _threads_started = True


def threads_started() -> bool:
    """Whether this process has hashed with blake3's own threads. Its thread pool does not
    survive a fork: a child forked after this must never use them (see trustdb.hashpool)."""
    return _threads_started


HashResult = tuple[str, HashedFile | HashingError]
"""(path, what hashing it gave): a HashingError is a value here, one per failed file."""


def hash_many(
    paths: Iterable[str],
    *,
    workers: int | None = None,
    batch: int = BATCH,
    follow_symlinks: bool = False,
    want_sha256: bool = False,
    want_md5: bool = False,
    executable_only: bool = False,
) -> Iterator[HashResult]:
    """Hash many files in parallel, yielding results in the order of `paths`.

    Threads, not processes: open/read/fstat and blake3 on large buffers release the GIL, and
    measured on /usr (bench/hash.py) batched threads match a process pool without forking a
    process that may hold an LMDB transaction. Files go to threads in batches, because one
    future per small file costs more than hashing it. `paths` is consumed lazily (a walk can
    feed it), with a bounded number of batches in flight.
    """
    n = workers or max(2, os.cpu_count() or 2)

    def run(chunk: list[str]) -> list[HashResult]:
        out: list[HashResult] = []
        for p in chunk:
            try:
                hashed = hash_file(
                    p,
                    follow_symlinks=follow_symlinks,
                    want_sha256=want_sha256,
                    want_md5=want_md5,
                    executable_only=executable_only,
                )
                out.append((p, hashed))
            except HashingError as e:
                out.append((p, e))
        return out

    with ThreadPoolExecutor(max_workers=n, thread_name_prefix="hash") as pool:
        pending: deque[Future[list[HashResult]]] = deque()
        for chunk in _batches(paths, batch):
            pending.append(pool.submit(run, chunk))
            while len(pending) >= 4 * n:
                yield from pending.popleft().result()
        while pending:
            yield from pending.popleft().result()


def _batches(items: Iterable[str], size: int) -> Iterator[list[str]]:
    chunk: list[str] = []
    for item in items:
        chunk.append(item)
        if len(chunk) >= size:
            yield chunk
            chunk = []
    if chunk:
        yield chunk


def hash_bytes(data: bytes) -> bytes:
    """BLAKE3-256 of an in-memory buffer (package payload members)."""
    return blake3.blake3(data).digest()
