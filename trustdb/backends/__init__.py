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
    "BackgroundLoad",
    "EngineConfig",
    "KeySink",
    "LsmBackend",
    "Probe",
    "Scope",
    "TracepointBackend",
    "names",
    "probe_and_remember",
    "remembered_or_probe",
    "select",
    "select_loaded",
]

COMPILED: list[type[Backend]] = [LsmBackend, TracepointBackend]
"""Every backend, sorted by `strength` (strongest first) in `select`. Add new ones here."""


def names() -> list[str]:
    return [b.name for b in sorted(COMPILED, key=lambda b: -b.strength)]


def _candidates(name: str | None) -> list[type[Backend]]:
    """The backends to try, strongest first: all of them, or the one named."""
    table = sorted(COMPILED, key=lambda b: -b.strength)
    if name is not None:
        table = [b for b in table if b.name == name]
        if not table:
            raise BackendError(f"unknown backend {name!r} (known: {', '.join(names())})")
    return table


def select(name: str | None = None) -> Backend:
    """The backend named `name`, or the strongest one this kernel accepts.

    Raises BackendError naming every refusal when none (or not the named one) can run."""
    table = _candidates(name)
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


def select_loaded(name: str | None, config: EngineConfig) -> Backend:
    """Like `select`, but returns the backend already loaded with `config`, and loads each
    object once: for a backend whose probe is only a load (`probe_is_load`), the real load is
    the probe. `trustdb run` used to load the chosen object twice (probe, then load: about
    0.1 s each on this machine).

    While a stronger backend runs its own probe, the next one (if its probe is its load) is
    loaded on a thread at the same time, so a kernel that refuses the stronger one does not
    pay for both in turn; if the stronger probe succeeds, the spare is closed unused (loaded,
    never attached: it decides nothing)."""
    table = _candidates(name)
    refused: list[tuple[str, str]] = []
    spare: _SpareLoad | None = None
    try:
        for i, cls in enumerate(table):
            if spare is not None and spare.cls is cls:
                backend, error = spare.result()
                spare = None
            else:
                backend, error = cls(), None
                if not backend.probe_is_load:
                    probe = _remembered_probe(backend)
                    if probe is None:
                        nxt = table[i + 1] if i + 1 < len(table) else None
                        if nxt is not None and nxt().probe_is_load:
                            spare = _SpareLoad(nxt, config)
                        probe = probe_and_remember(backend)
                    if not probe.ok:
                        refused.append((cls.name, probe.reason))
                        continue
                try:
                    backend.load(config)
                except BackendError as e:
                    error = e
            if error is not None:
                refused.append((cls.name, str(error).splitlines()[0]))
                continue
            backend.refused = tuple(refused)
            return backend
    finally:
        if spare is not None:  # the stronger backend won: the spare is never attached
            spare.discard()
    raise BackendError(
        "no enforcement backend works on this kernel: " + "; ".join(r for _, r in refused)
    )


def _remembered_probe(backend: Backend) -> Probe | None:
    """This boot's remembered probe of `backend`'s object (trustdb.probecache), if any."""
    from trustdb import probecache

    path = getattr(backend, "object_path", None)
    key = probecache.current_key(path) if path is not None else None
    found = probecache.recall(backend.name, key) if key is not None else None
    if found is None:
        return None
    return Probe(found.ok, found.reason)


def remembered_or_probe(backend: Backend) -> Probe:
    """This boot's remembered probe of `backend`, else a probe now (remembered)."""
    return _remembered_probe(backend) or probe_and_remember(backend)


def probe_and_remember(backend: Backend) -> Probe:
    """Probe `backend` now, and remember the answer for this boot, kernel and object."""
    from trustdb import probecache

    probe = backend.probe()
    path = getattr(backend, "object_path", None)
    key = probecache.current_key(path) if path is not None else None
    if key is not None:
        probecache.remember(backend.name, key, probe.ok, probe.reason)
    return probe


class _SpareLoad:
    """One backend loading on a thread (the libbpf load releases the GIL)."""

    def __init__(self, cls: type[Backend], config: EngineConfig) -> None:
        import threading

        self.cls = cls
        self._backend = cls()
        self._error: BackendError | None = None
        self._thread = threading.Thread(target=self._load, args=(config,), name="spare-load")
        self._thread.start()

    def _load(self, config: EngineConfig) -> None:
        try:
            self._backend.load(config)
        except BackendError as e:
            self._error = e

    def result(self) -> tuple[Backend, BackendError | None]:
        self._thread.join()
        return self._backend, self._error

    def discard(self) -> None:
        self._thread.join()
        self._backend.detach()


class BackgroundLoad:
    """`select_loaded(name, config)` on a thread started now: `trustdb run` builds the rest of
    the run (its guards, the interpreters' digests, the database and the mirror's first fill)
    while libbpf and the kernel's verifier, which release the GIL, load the engine. Loaded is
    not attached: nothing decides until the engine attaches it (trustdb.engine.Engine.start).
    Start it only after the last fork made before the tree runs (the child, the reaper)."""

    def __init__(self, name: str | None, config: EngineConfig) -> None:
        import threading

        self.name = name
        self.config = config
        self._backend: Backend | None = None
        self._error: BaseException | None = None
        self._taken = False
        self._thread = threading.Thread(target=self._load, name="engine-load", daemon=True)
        self._thread.start()

    def _load(self) -> None:
        try:
            self._backend = select_loaded(self.name, self.config)
        except BaseException as e:  # noqa: BLE001 - re-raised by result(), on the owner's thread
            self._error = e

    def result(self) -> Backend:
        """The loaded backend (once: its owner detaches it), or what the load raised."""
        self._thread.join()
        if self._error is not None:
            raise self._error
        assert self._backend is not None
        self._taken = True
        return self._backend

    def discard(self) -> None:
        """Detach the backend unless result() handed it over (idempotent)."""
        self._thread.join()
        if self._backend is not None and not self._taken:
            self._backend.detach()
            self._backend = None
