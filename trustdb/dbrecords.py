"""The trust database's errors and the records it hands out (values only; callers import them
from here, `trustdb.db` does not re-export them)."""

from __future__ import annotations

from dataclasses import dataclass

from trustdb.model import FileKind


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


@dataclass(frozen=True, slots=True)
class ContentRecord:
    """One trusted content (a row of `content`)."""

    digest: bytes
    size: int
    kind: FileKind
    first_trusted: float
    last_trusted: float
    sha256: bytes | None


@dataclass(frozen=True, slots=True)
class DatabaseStatus:
    """What `trustdb status` shows."""

    path: str
    schema: int
    generation: int
    entries: int
    contents: int
    sources: int
    cached_verifications: int
    size_on_disk: int
    """Bytes allocated to data.mdb and lock.mdb."""
    map_size: int
