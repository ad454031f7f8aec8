"""The one interface every trust source implements (pip-audit's DependencySource shape).

An importer reads a package manager's own records, verifies each file it names against the
package's digest, and yields what it found. It never opens the trust database: the caller hands
the whole stream to `TrustDB.replace_source()`, which writes it in one transaction.
"""

from __future__ import annotations

import abc
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Protocol

from trustdb.model import FileDigests, InodeKey, StreamItem


class ImporterError(Exception):
    """Base error for importers: the whole import is refused, nothing is written."""


class DigestCache(Protocol):
    """Read-only lookup of earlier verifications (the database provides one).

    Keyed by inode identity and size, so an unchanged file on disk is not read again.
    Returns None when the cached result lacks a digest the caller asked for.
    """

    def lookup(
        self, key: InodeKey, size: int, *, want_sha256: bool = False, want_md5: bool = False
    ) -> FileDigests | None: ...


class NoCache:
    """A DigestCache that never hits (tests, first run)."""

    def lookup(
        self, key: InodeKey, size: int, *, want_sha256: bool = False, want_md5: bool = False
    ) -> FileDigests | None:
        return None


@dataclass(frozen=True, slots=True)
class SourceInfo:
    """Which source an import replaces: the label is the unit of atomic replacement."""

    label: str
    """e.g. `deb:/`, `rpm:/srv/root`, `python:/home/u/venv`, `rpmfile`."""
    kind: str
    """The importer's name: `deb`, `rpm`, `python`, `dir`, `manual`."""


class Importer(abc.ABC):
    """A trust source. Subclasses take their options as keyword-only constructor arguments."""

    name: str

    @abc.abstractmethod
    def source(self) -> SourceInfo:
        """The source label this import replaces."""

    @abc.abstractmethod
    def collect(self, cache: DigestCache) -> Iterator[StreamItem]:
        """Yield every file of the source, verified, or skipped with a reason.

        Raises ImporterError (a subclass) when the source as a whole cannot be read: the caller
        then writes nothing.
        """
