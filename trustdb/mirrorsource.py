"""What the mirror reads from the trust database, what it reports, and where it can write
before the kernel map exists (`BufferedKeySink`).

`MirrorSource` is the database side (`trustdb.db.TrustDB` provides it); a sync reads through one
`SyncSnapshot` (one read transaction: `TrustDB.snapshot()`). A source without `snapshot()` (the
small fakes in tests) is read through `PerCallSnapshot`, one call per lookup.
"""

from __future__ import annotations

import threading
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import Protocol

from trustdb.backends.interface import KeySink
from trustdb.model import FileDigests, InodeKey


class SyncSnapshot(Protocol):
    """One consistent view of the database for one sync (`trustdb.dbview.MirrorSnapshot`)."""

    generation: int

    def paths(self) -> Iterator[tuple[str, tuple[bytes, ...]]]:
        """Every recorded path once, sorted, with the digests recorded for it."""
        ...

    def cached_blake3(self, key: InodeKey, size: int) -> bytes | None: ...

    def is_trusted(self, digest: bytes) -> bool: ...

    def close(self) -> None: ...


class MirrorSource(Protocol):
    """What the mirror reads from the trust database (`trustdb.db.TrustDB` provides it)."""

    @property
    def generation(self) -> int: ...

    def iter_paths(self, label: str | None = None) -> Iterator[_PathRecordLike]: ...

    def is_trusted(self, digest: bytes) -> bool: ...

    def digest_cache(self) -> _DigestCacheLike: ...

    def record_verification(self, key: InodeKey, digests: FileDigests) -> None: ...

    def record_verifications(self, items: Iterable[tuple[InodeKey, FileDigests]]) -> None: ...


class _PathRecordLike(Protocol):
    @property
    def path(self) -> str: ...


class _DigestCacheLike(Protocol):
    def lookup(self, key: InodeKey, size: int) -> FileDigests | None: ...


@dataclass(frozen=True, slots=True)
class SkippedPath:
    """A recorded path the mirror did not insert, and why (a value, not an exception)."""

    path: str
    reason: str


@dataclass(frozen=True, slots=True)
class MirrorStats:
    """What one `Mirror.sync` did."""

    generation: int
    """Database generation that was mirrored."""
    paths: int
    """Distinct recorded paths walked."""
    inserted: int
    """Keys added to the kernel map by this sync."""
    removed: int
    """Keys taken out (content no longer trusted, or the file changed)."""
    mirrored: int
    """Keys in the kernel map after the sync (paths plus first-seen files)."""
    cached: int
    """Paths whose digest came from the verification cache (no read)."""
    hashed: int
    """Paths that were read and hashed."""
    deferred: int
    """Paths that had to wait for their ctime tick to pass."""
    skipped: tuple[SkippedPath, ...]
    elapsed: float
    """Seconds, wall clock."""

    def skip_counts(self) -> dict[str, int]:
        """Skipped paths counted by reason, most frequent first."""
        counts: dict[str, int] = {}
        for s in self.skipped:
            counts[s.reason] = counts.get(s.reason, 0) + 1
        return dict(sorted(counts.items(), key=lambda kv: (-kv[1], kv[0])))

    def summary(self) -> str:
        """One line for a person: `mirrored 812 keys from 840 paths (...) in 0.21 s`."""
        line = (
            f"mirrored {self.mirrored} keys from {self.paths} paths"
            f" (+{self.inserted} -{self.removed}; {self.cached} cached, {self.hashed} hashed"
        )
        if self.deferred:
            line += f", {self.deferred} waited for their ctime tick"
        line += f") in {self.elapsed:.2f} s"
        if self.skipped:
            reasons = "; ".join(f"{n} {r}" for r, n in self.skip_counts().items())
            line += f"; {len(self.skipped)} skipped: {reasons}"
        return line


class PerCallSnapshot:
    """A `SyncSnapshot` over a source's plain calls (for sources without `snapshot()`)."""

    def __init__(self, db: MirrorSource) -> None:
        self._db = db
        self._cache = db.digest_cache()
        self.generation = db.generation

    def paths(self) -> Iterator[tuple[str, tuple[bytes, ...]]]:
        last: str | None = None
        digests: list[bytes] = []
        for record in self._db.iter_paths():
            if record.path != last:
                if last is not None:
                    yield last, tuple(digests)
                last, digests = record.path, []
            digest = getattr(record, "digest", None)
            if digest is not None:
                digests.append(digest)
        if last is not None:
            yield last, tuple(digests)

    def cached_blake3(self, key: InodeKey, size: int) -> bytes | None:
        cached = self._cache.lookup(key, size)
        return cached.blake3 if cached is not None else None

    def is_trusted(self, digest: bytes) -> bool:
        return self._db.is_trusted(digest)

    def close(self) -> None:
        pass


def open_snapshot(db: MirrorSource) -> SyncSnapshot:
    """The source's own snapshot (one read transaction) if it has one, else per-call reads."""
    snapshot = getattr(db, "snapshot", None)
    return snapshot() if snapshot is not None else PerCallSnapshot(db)


class BufferedKeySink:
    """A KeySink that holds keys until the real sink exists, then forwards everything.

    `trustdb run` lets the mirror's first sync (stat and lookups, Python) run while the BPF
    object loads (the kernel's verifier, with the GIL released), and hands the keys over in one
    batch once the map exists: start-up pays for the longer of the two, not their sum."""

    def __init__(self) -> None:
        self._held: dict[InodeKey, None] = {}
        self._target: KeySink | None = None
        self._lock = threading.Lock()

    def add(self, keys: Sequence[InodeKey]) -> None:
        with self._lock:
            if self._target is None:
                self._held.update(dict.fromkeys(keys))
                return
        self._target.add(keys)

    def remove(self, keys: Sequence[InodeKey]) -> None:
        with self._lock:
            if self._target is None:
                for k in keys:
                    self._held.pop(k, None)
                return
        self._target.remove(keys)

    def attach(self, target: KeySink, batch: int = 1 << 16) -> None:
        """Forward from now on; first insert what was held, in batches."""
        with self._lock:
            held, self._held = list(self._held), {}
            for start in range(0, len(held), batch):
                target.add(held[start : start + batch])
            self._target = target
