"""One mirror walk's scratch state (`Mirror.sync` and `Mirror.refresh`): what examining a
path gave, and the counters and results gathered on the way. Mutable, never handed out."""

from __future__ import annotations

import os
from dataclasses import dataclass, field

from trustdb.fskeys import OverlayMount, overlay_mounts
from trustdb.mirrorsource import SkippedPath, SyncSnapshot
from trustdb.model import FileDigests, InodeKey


@dataclass(frozen=True, slots=True)
class _Verified:
    keys: tuple[InodeKey, ...]
    digest: bytes


@dataclass(frozen=True, slots=True)
class _Deferred:
    until_ns: int


@dataclass(frozen=True, slots=True)
class _ToHash:
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
    _overlays: list[OverlayMount] | None = None

    def overlay_mounts(self) -> list[OverlayMount]:
        """The overlay mounts, read once per sync (only if an overlay file is met)."""
        if self._overlays is None:
            self._overlays = overlay_mounts()
        return self._overlays

    inserted: int = 0
    cached: int = 0
    hashed: int = 0
