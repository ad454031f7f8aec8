"""Trust sources: one module per package manager, all implementing `interface.Importer`.

The names below are imported on first use (PEP 562): `trustdb run` and most verbs import the
CLI, which names the importers, and importing every package manager's parser up front (python-
debian alone) cost about 0.1 s of every start-up."""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

_WHERE = {
    "DebImporter": "deb",
    "DebImporterError": "deb",
    "DigestCache": "interface",
    "Importer": "interface",
    "ImporterError": "interface",
    "NoCache": "interface",
    "SourceInfo": "interface",
    "ImportStats": "ondisk",
    "PythonImporter": "python",
    "PythonImporterError": "python",
    "RpmDbImporter": "rpm",
    "RpmFileImporter": "rpm",
    "RpmImporterError": "rpm",
}

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

if TYPE_CHECKING:
    from trustdb_importers.deb import DebImporter, DebImporterError
    from trustdb_importers.interface import (
        DigestCache,
        Importer,
        ImporterError,
        NoCache,
        SourceInfo,
    )
    from trustdb_importers.ondisk import ImportStats
    from trustdb_importers.python import PythonImporter, PythonImporterError
    from trustdb_importers.rpm import RpmDbImporter, RpmFileImporter, RpmImporterError


def __getattr__(name: str) -> Any:
    module = _WHERE.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f"{__name__}.{module}"), name)
    globals()[name] = value
    return value
