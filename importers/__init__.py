"""Trust sources: one module per package manager, all implementing `interface.Importer`."""

from importers.interface import DigestCache, Importer, ImporterError, NoCache, SourceInfo

__all__ = ["DigestCache", "Importer", "ImporterError", "NoCache", "SourceInfo"]
