"""The trust database: stores and looks up, decides nothing (Santa's SNTRuleTable).

CONTRACT (implemented by the trust-database issue; other stages code against these names).
The schema is documented in ONE place: the SCHEMA docstring below, kept next to the code.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

from trustdb.model import FileDigests, InodeKey, SkippedEntry, TrustEntry

DEFAULT_DB = Path("/var/lib/trustdb")


class DatabaseError(Exception):
    """Base error for the database stage (one line, shown to the user as is)."""


class SchemaError(DatabaseError):
    """The database was written by an unknown (newer) schema."""


class BusyError(DatabaseError):
    """Another writer holds the database."""


class DiskFullError(DatabaseError):
    """The disk is full; the transaction was aborted and the database is unchanged."""


@dataclass(frozen=True, slots=True)
class WriteStats:
    """What one write transaction did."""

    added: int
    """Entries (source, path) that are new or whose digest changed."""
    removed: int
    """Entries the source no longer names."""
    unchanged: int
    generation: int
    """The database generation after the commit (unchanged if nothing was written)."""


@dataclass(frozen=True, slots=True)
class SourceRecord:
    label: str
    kind: str
    entries: int
    updated: float
    """Unix time of the last write to this source."""


@dataclass(frozen=True, slots=True)
class PathRecord:
    """One (source, path) fact."""

    path: str
    label: str
    digest: bytes
    origin: str
    trusted_at: float


class TrustDB:
    """One LMDB environment.

    Usage: `with TrustDB.open(path, write=True) as db: db.replace_source(...)`.
    Readers never block on a writer; every write method is exactly one transaction.
    """

    @classmethod
    def open(cls, path: Path, *, write: bool = False) -> TrustDB:
        raise NotImplementedError

    def close(self) -> None:
        raise NotImplementedError

    def __enter__(self) -> TrustDB:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # --- writes (one transaction each) ---
    def replace_source(
        self, label: str, kind: str, items: Iterable[TrustEntry | SkippedEntry]
    ) -> WriteStats:
        """Make the source's entries exactly `items` (TrustEntry only; SkippedEntry values are
        passed through to `last_skipped` for reporting). Content no longer trusted by any source
        disappears in the same transaction. Writes nothing (same generation) if nothing changed.
        Caches each entry's `inode` verification (see `digest_cache`)."""
        raise NotImplementedError

    def add_entries(self, label: str, kind: str, entries: Iterable[TrustEntry]) -> WriteStats:
        """Add or update entries of a source without removing others (`trustdb trust`)."""
        raise NotImplementedError

    def remove_paths(self, paths: Iterable[str], label: str | None = None) -> WriteStats:
        raise NotImplementedError

    def remove_source(self, label: str) -> WriteStats:
        raise NotImplementedError

    def record_verification(self, key: InodeKey, digests: FileDigests) -> None:
        """Cache the verification of one on-disk file (used by the mirror)."""
        raise NotImplementedError

    # --- reads ---
    @property
    def generation(self) -> int:
        raise NotImplementedError

    def is_trusted(self, digest: bytes) -> bool:
        raise NotImplementedError

    def trusted_by(self, digest: bytes) -> list[PathRecord]:
        """Every (source, path) that vouches for this content."""
        raise NotImplementedError

    def records_for_path(self, path: str) -> list[PathRecord]:
        raise NotImplementedError

    def iter_paths(self, label: str | None = None) -> Iterator[PathRecord]:
        """Every recorded (path, source) fact, sorted by path (the mirror walks this)."""
        raise NotImplementedError

    def sources(self) -> list[SourceRecord]:
        raise NotImplementedError

    def digest_cache(self) -> "DigestCacheView":
        """A read-only `importers.interface.DigestCache` over cached verifications."""
        raise NotImplementedError


class DigestCacheView:
    def lookup(
        self, key: InodeKey, size: int, *, want_sha256: bool = False, want_md5: bool = False
    ) -> FileDigests | None:
        raise NotImplementedError
