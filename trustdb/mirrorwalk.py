"""One mirror walk (`Mirror.sync` and `Mirror.refresh`): examining each recorded path (steps 1-5
of trustdb.mirror's docstring: stat, filesystem, ctime tick, cache, the check after a read), and
the walk's scratch state: what examining a path gave, and the counters and results gathered on
the way (mutable, never handed out)."""

from __future__ import annotations

import os
import stat as statmod
from dataclasses import dataclass, field
from typing import NamedTuple

from trustdb import fskeys
from trustdb.fskeys import (
    MULTIGRAIN_FS,
    OVERLAYFS_SUPER_MAGIC,
    UNKEYABLE_FS,
    OverlayMount,
    ctime_settled_at,
    fs_magic,
    kernel_keys,
    overlay_mounts,
)
from trustdb.hashing import HashedFile, HashingError
from trustdb.mirrorsource import SkippedPath, SyncSnapshot
from trustdb.model import FileDigests, InodeKey

REASON_VANISHED = "vanished (no such file)"
REASON_NOT_REGULAR = "not a regular file"
REASON_UNTRUSTED = "content not trusted (changed since it was trusted?)"
REASON_CHANGED = "changed while being mirrored"
REASON_UNSETTLED = "modified again and again within its ctime tick; retried on the next sync"


def same_file(a: os.stat_result, b: os.stat_result) -> bool:
    """One unchanged inode: same identity, ctime, mtime and size."""
    return (
        a.st_dev == b.st_dev
        and a.st_ino == b.st_ino
        and a.st_ctime_ns == b.st_ctime_ns
        and a.st_mtime_ns == b.st_mtime_ns
        and a.st_size == b.st_size
    )


# NamedTuples, not frozen dataclasses: one is made per path of a sync (137k at a service start),
# and a frozen dataclass's __init__ goes through object.__setattr__ per field (profiled).
class _Verified(NamedTuple):
    keys: tuple[InodeKey, ...]
    digest: bytes


class _Deferred(NamedTuple):
    until_ns: int


class _ToHash(NamedTuple):
    stat: os.stat_result
    keys: tuple[InodeKey, ...]


_Outcome = _Verified | _Deferred | _ToHash | str
"""What examining one path gave: a key, a wait, a read to do, or the reason it is skipped."""


@dataclass
class _Walk:
    """Counters and results of one sync walk (mutable scratch, not handed out)."""

    snapshot: SyncSnapshot
    wanted: dict[InodeKey, bytes] = field(default_factory=dict)
    skipped: list[SkippedPath] = field(default_factory=list)
    verifications: list[tuple[InodeKey, FileDigests]] = field(default_factory=list)
    pending: list[InodeKey] = field(default_factory=list)
    """Verified keys not yet handed to the sink (flushed every `batch_size`)."""
    to_hash: dict[str, tuple[_ToHash, tuple[bytes, ...]]] = field(default_factory=dict)
    """Paths to read: their stat from before the read, their keys, their recorded digests."""
    deferred: dict[str, tuple[int, tuple[bytes, ...]]] = field(default_factory=dict)
    """Paths waiting for the coarse clock to pass a value, with their recorded digests."""
    path_keys: dict[str, tuple[InodeKey, ...]] = field(default_factory=dict)
    """The keys each verified path gave (a refresh removes them when the path goes)."""
    untrusted: dict[bytes, set[str]] = field(default_factory=dict)
    """Paths whose content no source trusts, by digest."""
    fs_types: dict[int, int] = field(default_factory=dict)
    """st_dev -> statfs f_type: one statfs per filesystem, not per path (one st_dev is one
    superblock)."""
    kernel_devs: dict[int, int] = field(default_factory=dict)
    """st_dev -> the kernel's encoding of it (InodeKey.dev), once per filesystem."""
    _overlays: list[OverlayMount] | None = None

    def overlay_mounts(self) -> list[OverlayMount]:
        """The overlay mounts, read once per sync (only if an overlay file is met)."""
        if self._overlays is None:
            self._overlays = overlay_mounts()
        return self._overlays

    inserted: int = 0
    cached: int = 0
    hashed: int = 0


@dataclass(frozen=True, slots=True)
class PathCheck:
    """How one path is examined and, after a read, checked (the rules of trustdb.mirror)."""

    multigrain_kernel: bool
    """Does this kernel give fine-grained ctimes (6.13+)?"""
    detect_fs: bool
    """Also require a multigrain filesystem (False: trust `multigrain_kernel` as given)."""

    def settled(self, st: os.stat_result, magic: int) -> bool:
        """Is a write from now on sure to change this file's ctime (and so its key)?"""
        if self.multigrain_kernel and (not self.detect_fs or magic in MULTIGRAIN_FS):
            return True
        return fskeys.coarse_now_ns() >= ctime_settled_at(st)

    def examine(self, path: str, recorded: tuple[bytes, ...], walk: _Walk) -> _Outcome:
        """Everything short of reading the file: stat, filesystem, ctime tick, cache.
        `recorded`: the digests the database records for this path (a cached digest among
        them is trusted without another lookup: an entry implies its content record)."""
        try:
            st = os.stat(path)
        except FileNotFoundError:
            return REASON_VANISHED
        except OSError as e:
            return f"cannot stat: {e.strerror}"
        if not statmod.S_ISREG(st.st_mode):
            return REASON_NOT_REGULAR
        magic = walk.fs_types.get(st.st_dev)
        if magic is None:
            try:
                magic = walk.fs_types[st.st_dev] = fs_magic(path)
            except OSError as e:
                return f"cannot statfs: {e.strerror}"
        if magic in UNKEYABLE_FS or magic == OVERLAYFS_SUPER_MAGIC:
            keys = kernel_keys(path, st, magic, walk.overlay_mounts)
            if isinstance(keys, str):
                return keys
        else:  # InodeKey.from_stat, with the device's encoding worked out once per filesystem
            kdev = walk.kernel_devs.get(st.st_dev)
            if kdev is None:
                kdev = walk.kernel_devs[st.st_dev] = InodeKey.from_stat(st).dev
            keys = (InodeKey(kdev, st.st_ino, *divmod(st.st_ctime_ns, 1_000_000_000)),)
        if not self.settled(st, magic):
            return _Deferred(ctime_settled_at(st))
        cached = walk.snapshot.cached_blake3(keys[0], st.st_size)
        if cached is None:
            return _ToHash(st, keys)
        walk.cached += 1
        if cached not in recorded and not walk.snapshot.is_trusted(cached):
            walk.untrusted.setdefault(cached, set()).add(path)
            return REASON_UNTRUSTED
        return _Verified(keys, cached)

    @staticmethod
    def check_hashed(path: str, queued: _ToHash, recorded: tuple[bytes, ...],
                     result: HashedFile | HashingError, walk: _Walk) -> _Verified | str:
        """After a read: the file read is the file examined, and its content is trusted."""
        if isinstance(result, HashingError):
            return str(result)
        walk.hashed += 1
        try:
            after = os.stat(path)
        except OSError:
            return REASON_CHANGED
        # The path's first stat, the fd that was read and the path afterwards: one unchanged
        # inode (hash_file has already compared the fd's stat before and after the read).
        if not (same_file(queued.stat, result.stat) and same_file(result.stat, after)):
            return REASON_CHANGED
        walk.verifications.append((queued.keys[0], result.digests))
        digest = result.digests.blake3
        if digest not in recorded and not walk.snapshot.is_trusted(digest):
            walk.untrusted.setdefault(digest, set()).add(path)
            return REASON_UNTRUSTED
        return _Verified(queued.keys, digest)
