"""Trust sources: one module per package manager, all implementing `interface.Importer`."""

from trustdb_importers.deb import DebImporter, DebImporterError
from trustdb_importers.interface import DigestCache, Importer, ImporterError, NoCache, SourceInfo
from trustdb_importers.ondisk import ImportStats
from trustdb_importers.python import PythonImporter, PythonImporterError
from trustdb_importers.rpm import RpmDbImporter, RpmFileImporter, RpmImporterError

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
