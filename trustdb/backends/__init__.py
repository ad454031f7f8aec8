"""Kernel enforcement backends behind one interface (see interface.py).

`COMPILED` lists every backend this build knows, strongest first (fapolicyd's `compiled[]`).
`select()` probes them in that order and returns the first the running kernel accepts, with the
reasons the stronger ones were refused in `Backend.refused`.
"""

from __future__ import annotations

from trustdb.backends.interface import (
    Backend,
    BackendError,
    EngineConfig,
    KeySink,
    Probe,
    Scope,
)
from trustdb.backends.lsm import LsmBackend
from trustdb.backends.tracepoint import TracepointBackend

__all__ = [
    "COMPILED",
    "Backend",
    "BackendError",
    "EngineConfig",
    "KeySink",
    "LsmBackend",
    "Probe",
    "Scope",
    "TracepointBackend",
    "names",
    "select",
]

COMPILED: list[type[Backend]] = [LsmBackend, TracepointBackend]
"""Every backend, sorted by `strength` (strongest first) in `select`. Add new ones here."""


def names() -> list[str]:
    return [b.name for b in sorted(COMPILED, key=lambda b: -b.strength)]


def select(name: str | None = None) -> Backend:
    """The backend named `name`, or the strongest one this kernel accepts.

    Raises BackendError naming every refusal when none (or not the named one) can run."""
    table = sorted(COMPILED, key=lambda b: -b.strength)
    if name is not None:
        table = [b for b in table if b.name == name]
        if not table:
            raise BackendError(f"unknown backend {name!r} (known: {', '.join(names())})")
    refused: list[tuple[str, str]] = []
    for cls in table:
        backend = cls()
        probe = backend.probe()
        if probe.ok:
            backend.refused = tuple(refused)
            return backend
        refused.append((cls.name, probe.reason))
    raise BackendError(
        "no enforcement backend works on this kernel: " + "; ".join(r for _, r in refused)
    )
