"""Trust sources: one module per package manager, all implementing `interface.Importer`."""

from importers.deb import DebImporter, DebImporterError
from importers.interface import DigestCache, Importer, ImporterError, NoCache, SourceInfo
from importers.ondisk import ImportStats
from importers.python import PythonImporter, PythonImporterError
from importers.rpm import RpmDbImporter, RpmFileImporter, RpmImporterError

__all__ = [
    "DebImporter",
    "DebImporterError",
    "DigestCache",
    "ImportStats",
    "Importer",
    "ImporterError",
    "NoCache",
    "PythonImporter",
    "PythonImporterError",
    "RpmDbImporter",
    "RpmFileImporter",
    "RpmImporterError",
    "SourceInfo",
]
