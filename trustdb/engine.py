"""The enforcement engine: the chosen backend, loaded, attached, and always detached.

    with Engine(EngineConfig(mode=Mode.ENFORCE, scope=Scope.for_cgroup(cg))) as engine:
        mirror = Mirror(db, engine.trusted_inodes)    # fills the kernel map
        engine.confine(pidfd)                          # the supervised child
        ... events from engine.events_fd (trustdb.events) ...
    # everything is detached here, whatever happened inside

Nothing is pinned: every link and map lives in this process's fds, so when the process dies the
kernel removes the programs too. The optional `prewarm` callback (the mirror's `verify_file`)
runs from a fanotify exec-permission handler, before the kernel's exec check: a first-seen copy
of trusted content gets its key inserted in time (trustdb/fanotify.py).
"""

from __future__ import annotations

import os
from collections.abc import Callable
from types import TracebackType
from typing import Self

from trustdb import backends
from trustdb.backends.interface import Backend, BackendError, EngineConfig, KeySink
from trustdb.model import InodeKey

Prewarm = Callable[[str | int], InodeKey | None]
"""Given an open fd (or a path) of a file about to be executed that the kernel map may not
know, verify its content and insert its key if trusted; return the key or None."""

Prepare = Callable[[Backend], "Prewarm | None"]
"""Runs once the programs are loaded and before they attach: fill the trusted-inode map (the
mirror's first sync) and return the pre-warm callback, if any. Attaching first would deny
everything in scope until the map is full: on a system-wide engine, every exec on the machine."""


class Engine:
    def __init__(
        self,
        config: EngineConfig,
        *,
        backend: str | Backend | None = None,
        prewarm: Prewarm | None = None,
        prepare: Prepare | None = None,
        allow_system_wide: bool = False,
    ) -> None:
        """`backend`: a name (`--backend`), an instance, or None for the strongest the kernel
        accepts. `allow_system_wide` must be set to enforce on the whole machine (service
        mode): a scope-less config is refused otherwise, so a test can never do it by mistake."""
        if config.scope.system_wide and not allow_system_wide:
            raise BackendError("refusing system-wide enforcement without allow_system_wide")
        self.config = config
        self._choice = backend
        self._prewarm = prewarm
        self._prepare = prepare
        self._backend: Backend | None = None
        self._prewarmer: object | None = None

    # ---- life cycle

    def start(self) -> None:
        if self._backend is not None:
            return
        given = isinstance(self._choice, Backend)
        backend = (
            self._choice
            if isinstance(self._choice, Backend)
            else backends.select_loaded(self._choice, self.config)  # loads each object once
        )
        try:
            if given:
                backend.load(self.config)
            prewarm = self._prewarm
            if self._prepare is not None:
                prewarm = self._prepare(backend) or prewarm
            if prewarm is not None:
                from trustdb.fanotify import ExecPrewarmer

                pw = ExecPrewarmer(prewarm, backend, scope=self.config.scope)
                pw.start()
                self._prewarmer = pw
            backend.attach()
        except BaseException:
            self._stop_prewarmer()
            backend.detach()
            raise
        self._backend = backend

    def stop(self) -> None:
        """Detach everything (idempotent)."""
        self._stop_prewarmer()
        backend, self._backend = self._backend, None
        if backend is not None:
            backend.detach()

    def _stop_prewarmer(self) -> None:
        pw, self._prewarmer = self._prewarmer, None
        if pw is not None:
            pw.stop()  # type: ignore[attr-defined]

    def __enter__(self) -> Self:
        self.start()
        return self

    def __exit__(
        self, t: type[BaseException] | None, v: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()

    # ---- what the other stages use

    @property
    def backend(self) -> Backend:
        if self._backend is None:
            raise BackendError("engine is not running")
        return self._backend

    @property
    def backend_name(self) -> str:
        return self.backend.name

    @property
    def trusted_inodes(self) -> KeySink:
        return self.backend.trusted_inodes

    @property
    def events_fd(self) -> int:
        return self.backend.events_fd

    def confine(self, pidfd: int) -> None:
        self.backend.confine(pidfd)

    def confine_pid(self, pid: int) -> None:
        """Confine by pid (racy if the pid can be reused: prefer `confine` with a pidfd held
        since the child was created)."""
        fd = os.pidfd_open(pid)
        try:
            self.confine(fd)
        finally:
            os.close(fd)
