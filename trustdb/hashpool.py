"""Hash many files on worker processes, one per core (`trustdb trust`, `trustdb import`).

Why processes: per small file, hashing is mostly Python (open, fstat, read, fstat, close and the
result objects: ~10 us), which threads cannot run in parallel under the GIL; measured on
/usr/lib (68k files, bench/hash.py) two worker processes take half the wall time of one, while
a thread pool gains nothing. Large files also use blake3's own threads inside the worker
(`hashing.HUGE_FILE`).

Why this shape:
- The workers are forked before the caller opens its write transaction (`with HashPool() as
  pool:` first), so no child is ever a copy of a process inside an LMDB transaction; the
  children never touch the database and exit with os._exit (multiprocessing's own exit).
- Paths go out and results come back in batches (one task per file would cost more than
  hashing it), at most `WINDOW` batches per worker in flight: memory stays flat on any tree.
- A result is a compact tuple (`Packed`), not a dataclass: pickling is the cost per file here.
- Results come back in the order of the paths, so output and reports stay deterministic.
"""

from __future__ import annotations

import fcntl
import multiprocessing
import os
import signal
import stat as statmod
import time
from collections import deque
from collections.abc import Iterable, Iterator
from contextlib import AbstractContextManager, nullcontext, suppress
from dataclasses import dataclass, replace
from multiprocessing.connection import Connection
from multiprocessing.context import BaseContext
from multiprocessing.process import BaseProcess
from typing import Self

import blake3

from trustdb.hashing import (
    FRESH_CTIME_SECONDS,
    SMALL_FILE,
    HashedFile,
    HashingError,
    NotExecutable,
    classify,
    hash_file,
    threads_started,
)
from trustdb.mapped import allow_mapping, mapping_allowed
from trustdb.model import FileDigests, FileKind, InodeKey

BATCH = 128
"""Paths per task: large enough that the task's own cost (~50 us) is noise."""

BATCH_BYTES = 128 << 10
"""At most this many bytes of path names per batch (long paths make smaller batches)."""

WINDOW = 3
"""Batches in flight per worker: enough that a batch with one huge file does not stall the
others, few enough that memory does not grow with the tree."""

PIPE_BYTES = 1 << 20
"""Pipe buffer asked for (Linux's default maximum for F_SETPIPE_SZ): more than WINDOW batches."""

F_SETPIPE_SZ = 1031

@dataclass(frozen=True, slots=True)
class HashRequest:
    """What each file of one `hash_paths` call is hashed for (sent once per batch)."""

    follow_symlinks: bool = False
    want_sha256: bool = False
    want_md5: bool = False
    executable_only: bool = False
    threads: bool = True
    """blake3's own threads for huge files (a worker forked after the parent used them never
    does: see `_serve`)."""


Packed = tuple[bytes, int, int, bytes | None, bytes | None, tuple[int, int, int, int], bool, float]
"""(blake3, size, kind, sha256, md5, inode key, cacheable, hashed_at) of one hashed file."""

PackedResult = Packed | str | None
"""A hashed file, the one-line reason it could not be hashed, or None: not executable."""

HashResult = tuple[str, HashedFile | HashingError]
"""(path, what hashing it gave): a HashingError is a value here, one per failed file."""


def _pack(hashed: HashedFile) -> Packed:
    d = hashed.digests
    return (
        d.blake3,
        d.size,
        int(d.kind),
        d.sha256,
        d.md5,
        tuple(hashed.inode),  # type: ignore[return-value]
        hashed.cacheable,
        hashed.hashed_at,
    )


_OPEN_FLAGS = os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC | os.O_NOCTTY


def hash_batch(paths: list[str], request: HashRequest) -> list[PackedResult]:
    """Hash each path (runs in a worker, or in-process for small jobs)."""
    if request.want_sha256 or request.want_md5:
        return [_hash_general(path, request) for path in paths]
    flags = _OPEN_FLAGS if request.follow_symlinks else _OPEN_FLAGS | os.O_NOFOLLOW
    return [_hash_small_blake3(path, flags, request) for path in paths]


def _hash_general(path: str, request: HashRequest) -> PackedResult:
    try:
        hashed = hash_file(
            path,
            follow_symlinks=request.follow_symlinks,
            want_sha256=request.want_sha256,
            want_md5=request.want_md5,
            executable_only=request.executable_only,
            threads=request.threads,
        )
    except NotExecutable:
        return None
    except HashingError as e:
        return str(e) or "cannot hash"
    return _pack(hashed)


def _hash_small_blake3(path: str, flags: int, request: HashRequest) -> PackedResult:
    """`hash_file` for the common case (BLAKE3 only, at most SMALL_FILE bytes), without its
    intermediate objects: per small file those cost as much as the hashing (profiled: 36 us
    against 18). The same checks: a regular file, one read of size + 1, unchanged after."""
    started = time.time()
    try:
        fd = os.open(path, flags)
    except OSError:
        return _hash_general(path, request)  # the general path words the error
    try:
        st = os.fstat(fd)
        size = st.st_size
        if size > SMALL_FILE or not statmod.S_ISREG(st.st_mode):
            return _hash_general(path, request)
        mode = st.st_mode
        if (
            request.executable_only
            and not mode & 0o111
            and classify(os.pread(fd, 4, 0), mode, path) is FileKind.OTHER
        ):
            return None
        data = os.read(fd, size + 1)
        after = os.fstat(fd)
    except OSError:
        return _hash_general(path, request)
    finally:
        os.close(fd)
    if (
        len(data) != size
        or after.st_size != size
        or after.st_ctime_ns != st.st_ctime_ns
        or after.st_mtime_ns != st.st_mtime_ns
    ):
        return "changed while being hashed"
    sec, nsec = divmod(st.st_ctime_ns, 1_000_000_000)
    dev = (os.major(st.st_dev) << 20) | os.minor(st.st_dev)
    return (
        blake3.blake3(data).digest(),
        size,
        int(classify(data[:4], mode, path)),
        None,
        None,
        (dev, st.st_ino, sec, nsec),
        started - st.st_ctime_ns / 1e9 >= FRESH_CTIME_SECONDS,
        started,
    )


@dataclass(frozen=True, slots=True)
class Hashed:
    """One file's result as the pool hands it back (what `TrustEntry` needs, no stat)."""

    digests: FileDigests
    inode: InodeKey
    cacheable: bool
    hashed_at: float


def unpack(packed: Packed) -> Hashed:
    blake, size, kind, sha256, md5, key, cacheable, hashed_at = packed
    return Hashed(
        FileDigests(blake3=blake, size=size, kind=FileKind(kind), sha256=sha256, md5=md5),
        InodeKey(*key),
        cacheable,
        hashed_at,
    )


class HashPool:
    """Worker processes that hash batches of paths. Use as a context manager, entered before
    any LMDB write transaction begins (see the module docstring).

    Each worker has its own task pipe and result pipe, and no helper thread runs in this
    process: a thread woken by every result (multiprocessing.Pool has three) takes the GIL
    each time an LMDB call releases it, which made every get/put of the import's transaction
    ~10x slower (profiled). Batches go round-robin, so worker i's results arrive in the order
    of its batches and the caller's order is kept. Deadlock-free by size: a pipe holds
    `PIPE_BYTES`, more than `WINDOW` batches of paths (capped at `BATCH_BYTES`) or results, so
    neither side ever blocks on a send while the other blocks on its own."""

    def __init__(self, workers: int | None = None) -> None:
        self.workers = workers or max(1, len(os.sched_getaffinity(0)))
        self._procs: list[_Worker] = []
        self._mapping: AbstractContextManager[bool] = nullcontext(False)

    def __enter__(self) -> Self:
        # Large files are hashed from mappings, here (while the pool is open) and in workers.
        self._mapping = mapping_allowed()
        self._mapping.__enter__()
        if self.workers > 1:
            ctx = multiprocessing.get_context("fork")
            threads = not threads_started()
            try:
                for _ in range(self.workers):
                    self._procs.append(_Worker.start(ctx, self._procs, threads))
            except BaseException:
                self.__exit__()  # the workers started so far, and SIGIO as it was
                raise
        return self

    def __exit__(self, *exc: object) -> None:
        for w in self._procs:
            w.close_tasks()  # all first: each worker then sees EOF and leaves at once
        for w in self._procs:
            w.stop()
        self._procs = []
        self._mapping.__exit__(None, None, None)

    def hash_paths(
        self, paths: Iterable[str], request: HashRequest = HashRequest()
    ) -> Iterator[tuple[str, PackedResult]]:
        """(path, result) for every path, in order. Consumes `paths` lazily.
        Raises HashingError if a worker dies (the caller's transaction is then aborted)."""
        batches = _batches(paths, BATCH)
        first = next(batches, None)
        if first is None:
            return
        second = next(batches, None) if len(first) == BATCH else None
        if not self._procs or second is None:
            # A small job (or one worker): no hand-over cost.
            for chunk in (first, second or []):
                yield from zip(chunk, hash_batch(chunk, request))
            for chunk in batches:
                yield from zip(chunk, hash_batch(chunk, request))
            return
        pending: deque[tuple[list[str], _Worker]] = deque()
        procs = self._procs
        for n, chunk in enumerate(_chain(first, second, batches)):
            worker = procs[n % len(procs)]
            worker.send(chunk, request)
            pending.append((chunk, worker))
            while len(pending) >= WINDOW * len(procs):
                done, by = pending.popleft()
                yield from zip(done, by.receive())
        while pending:
            done, by = pending.popleft()
            yield from zip(done, by.receive())


@dataclass(slots=True)
class _Worker:
    process: BaseProcess
    tasks: Connection
    results: Connection

    @classmethod
    def start(cls, ctx: BaseContext, siblings: list[_Worker], threads: bool) -> _Worker:
        task_r, task_w = ctx.Pipe(duplex=False)
        result_r, result_w = ctx.Pipe(duplex=False)
        for conn in (task_w, result_w):
            with suppress(OSError):  # a smaller pipe only means smaller batches in flight
                fcntl.fcntl(conn.fileno(), F_SETPIPE_SZ, PIPE_BYTES)
        # The child closes its copies of the parent's ends (its own and its older siblings'),
        # so that closing a task pipe in the parent is an EOF its worker sees.
        inherited = [task_w, result_r] + [c for w in siblings for c in (w.tasks, w.results)]
        proc = ctx.Process(target=_serve, args=(task_r, result_w, inherited, threads), daemon=True)
        proc.start()
        task_r.close()
        result_w.close()
        return cls(proc, task_w, result_r)

    def send(self, chunk: list[str], request: HashRequest) -> None:
        try:
            self.tasks.send((chunk, request))
        except OSError as e:
            raise HashingError(f"a hashing worker stopped ({e.strerror})") from e

    def receive(self) -> list[PackedResult]:
        try:
            answer = self.results.recv()
        except (EOFError, OSError) as e:
            raise HashingError("a hashing worker stopped (killed?)") from e
        if isinstance(answer, str):
            raise HashingError(f"a hashing worker failed: {answer}")
        return answer  # type: ignore[no-any-return]

    def close_tasks(self) -> None:
        with suppress(OSError):
            self.tasks.close()  # EOF: the worker leaves its loop

    def stop(self) -> None:
        self.close_tasks()
        self.process.join(timeout=1)
        if self.process.is_alive():
            self.process.kill()
            self.process.join()
        self.results.close()


def _serve(
    tasks: Connection, results: Connection, inherited: list[Connection], threads: bool
) -> None:
    """A worker's loop: a batch in, its results out, until the task pipe closes.

    blake3's own threads only when `threads`: its thread pool (rayon) is not fork-safe, and a
    parent that had hashed one huge file in-process before forking owns a pool whose locks a
    forked child would wait on for ever (seen: a test run hung so). A child forked before the
    parent ever started that pool starts its own, safely."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the parent handles ^C and stops us
    allow_mapping()
    for conn in inherited:
        conn.close()
    while True:
        try:
            chunk, request = tasks.recv()
        except (EOFError, OSError):
            return
        if not threads:
            request = replace(request, threads=False)
        try:
            answer: list[PackedResult] | str = hash_batch(chunk, request)
        except Exception as e:  # noqa: BLE001 (a bug, not a file problem: the parent aborts)
            answer = f"{type(e).__name__}: {e}"
        results.send(answer)


def _chain(first: list[str], second: list[str], rest: Iterator[list[str]]) -> Iterator[list[str]]:
    yield first
    yield second
    yield from rest


def _batches(items: Iterable[str], size: int) -> Iterator[list[str]]:
    chunk: list[str] = []
    nbytes = 0
    for item in items:
        chunk.append(item)
        nbytes += len(item)
        if len(chunk) >= size or nbytes >= BATCH_BYTES:
            yield chunk
            chunk = []
            nbytes = 0
    if chunk:
        yield chunk
