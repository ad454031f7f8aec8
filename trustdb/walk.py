"""Walk the paths a user names and turn the files found into trust entries (`trustdb trust`).

The rules, as users of find(1) and fapolicyd expect them:
- A path named on the command line is resolved (symlinks followed) and recorded under its real
  path, so `/lib/x` and `/usr/lib/x` on a merged-/usr system are one fact, as the kernel sees it.
- Inside a directory, symlinks are not followed (the target is recorded where it really lives,
  if it is under a walked directory). Without followed symlinks the only loop left is a bind
  mount of a directory into itself; directories are remembered by (dev, ino) so it cannot hang.
- FIFOs, sockets and device nodes are never opened (d_type / lstat only). Met inside a
  directory they are benign skips; named on the command line they are an error.
- Anything that cannot be read, vanishes or changes is a fatal SkippedEntry naming the path and
  the reason; the caller records the rest and exits non-zero.
"""

from __future__ import annotations

import errno
import os
import stat as statmod
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from operator import attrgetter
from typing import Literal

from trustdb.hashpool import HashPool, HashRequest
from trustdb.model import FileKind, InodeKey, SkippedEntry, TrustEntry

SYMLINK_SKIPPED = "symlink inside a directory (not followed)"

_name = attrgetter("name")

PROGRESS_EVERY = 64
"""Files between progress callbacks (and once at the end, with the totals)."""


@dataclass(frozen=True, slots=True)
class ScanProgress:
    """Running totals, passed to the progress callback every PROGRESS_EVERY files."""

    files: int
    bytes: int
    recorded: int


def node_kind(mode: int) -> str:
    """A user-facing name for a file type."""
    if statmod.S_ISFIFO(mode):
        return "FIFO"
    if statmod.S_ISSOCK(mode):
        return "socket"
    if statmod.S_ISCHR(mode):
        return "character device"
    if statmod.S_ISBLK(mode):
        return "block device"
    if statmod.S_ISDIR(mode):
        return "directory"
    if statmod.S_ISLNK(mode):
        return "symlink"
    return "regular file" if statmod.S_ISREG(mode) else "unknown file type"


def os_reason(e: OSError) -> str:
    """One line for an OSError, without the path (the caller prints the path)."""
    if e.errno == errno.ENOENT:
        return "vanished (no such file)"
    if e.errno in (errno.EACCES, errno.EPERM):
        return "unreadable (permission denied)"
    if e.errno == errno.ELOOP:
        return "symlink loop"
    return e.strerror or str(e)


def walk(paths: Iterable[str]) -> Iterator[str | SkippedEntry]:
    """Yield the real path of every regular file under `paths`, and a SkippedEntry for every
    node that is not one or cannot be walked. Directories are walked in sorted order."""
    seen_dirs: set[tuple[int, int]] = set()
    for arg in paths:
        yield from _walk_arg(arg, seen_dirs)


def _walk_arg(arg: str, seen_dirs: set[tuple[int, int]]) -> Iterator[str | SkippedEntry]:
    path = os.path.abspath(arg)
    try:
        st = os.stat(path)
    except OSError as e:
        if e.errno == errno.ENOENT and os.path.islink(path):
            yield SkippedEntry(path, "dangling symlink", fatal=True)
        else:
            yield SkippedEntry(
                path, os_reason(e) if e.errno != errno.ENOENT else "no such file", fatal=True
            )
        return
    real = os.path.realpath(path)
    if statmod.S_ISREG(st.st_mode):
        yield real
    elif statmod.S_ISDIR(st.st_mode):
        yield from _walk_dir(real, st, seen_dirs)
    else:
        yield SkippedEntry(real, f"not a regular file ({node_kind(st.st_mode)})", fatal=True)


def _walk_dir(
    top: str, top_st: os.stat_result, seen_dirs: set[tuple[int, int]]
) -> Iterator[str | SkippedEntry]:
    if (top_st.st_dev, top_st.st_ino) in seen_dirs:
        return  # named twice, or inside another named directory: walked already
    seen_dirs.add((top_st.st_dev, top_st.st_ino))
    stack = [top]
    while stack:
        directory = stack.pop()
        try:
            with os.scandir(directory) as it:
                entries = sorted(it, key=_name)
        except OSError as e:
            yield SkippedEntry(directory, f"cannot list directory: {os_reason(e)}", fatal=True)
            continue
        subdirs: list[str] = []
        for entry in entries:
            try:
                found = _classify_entry(entry, seen_dirs)
            except OSError as e:
                yield SkippedEntry(entry.path, os_reason(e), fatal=True)
                continue
            if found is True:
                subdirs.append(entry.path)
            else:
                yield found
        stack.extend(reversed(subdirs))


def _classify_entry(
    entry: os.DirEntry[str], seen_dirs: set[tuple[int, int]]
) -> str | SkippedEntry | Literal[True]:
    """-> the file's path, a skip, or True for a directory to descend into."""
    if entry.is_file(follow_symlinks=False):
        return entry.path
    if entry.is_symlink():
        return SkippedEntry(entry.path, SYMLINK_SKIPPED)
    st = entry.stat(follow_symlinks=False)
    if statmod.S_ISDIR(st.st_mode):
        key = (st.st_dev, st.st_ino)
        if key in seen_dirs:
            return SkippedEntry(entry.path, "directory seen before (bind-mount loop)")
        seen_dirs.add(key)
        return True
    return SkippedEntry(entry.path, f"{node_kind(st.st_mode)} (not read)")


def scan(
    paths: Iterable[str],
    *,
    all_files: bool = False,
    pool: HashPool | None = None,
    on_progress: Callable[[ScanProgress], None] | None = None,
) -> Iterator[TrustEntry | SkippedEntry]:
    """Walk `paths`, hash what was found (on `pool`'s worker processes, else in-process), and
    yield a TrustEntry per file to record: every regular file with `all_files`, else only
    executable content (ELF, exec bit, `#!`) and script sources by name
    (FileKind.SCRIPT_SOURCE: `.py`, `.pl`, `.sh`, ...). Each file is read once; any other file
    is not read past its first bytes. Holds a bounded number of files at any time."""
    skipped: list[SkippedEntry] = []

    def files_only() -> Iterator[str]:
        for item in walk(paths):
            if isinstance(item, SkippedEntry):
                skipped.append(item)
            else:
                yield item

    files = size = recorded = 0
    hasher = pool if pool is not None else HashPool(workers=1)
    results = hasher.hash_paths(files_only(), HashRequest(executable_only=not all_files))
    # Once per file in the main process, the bottleneck of a trust (the workers wait on it):
    # the kind and the inode key are made without a Python-level call (FileKind(kind) and
    # InodeKey(*key) are both Python code).
    kinds = {int(k): k for k in FileKind}
    new_key = tuple.__new__
    for files, (path, result) in enumerate(results, start=1):
        if skipped:
            yield from skipped
            skipped.clear()
        if result is None:
            pass  # not executable content
        elif isinstance(result, str):
            yield SkippedEntry(path, result, fatal=True)
        else:
            blake, nbytes, kind, _sha256, _md5, key, cacheable, _at = result
            size += nbytes
            recorded += 1
            yield TrustEntry(
                path=path,
                digest=blake,
                size=nbytes,
                kind=kinds[kind],
                inode=new_key(InodeKey, key) if cacheable else None,
            )
        if on_progress is not None and files % PROGRESS_EVERY == 0:
            on_progress(ScanProgress(files=files, bytes=size, recorded=recorded))
    yield from skipped
    if on_progress is not None:
        on_progress(ScanProgress(files=files, bytes=size, recorded=recorded))
