"""The enforcement engine: the chosen backend, loaded, attached, and always detached.

    with Engine(EngineConfig(mode=Mode.ENFORCE, scope=Scope.for_cgroup(cg))) as engine:
        mirror = Mirror(db, engine.trusted_inodes)    # fills the kernel map
        engine.confine(pidfd)                          # the supervised child
        ... events from engine.events_fd (trustdb.events) ...
    # everything is detached here, whatever happened inside

Nothing is pinned: every link and map lives in this process's fds, so when the process dies the
kernel removes the programs too. With `first_seen` (how to open the trust database read-only),
a forked handler process answers fanotify permission events before the kernel's checks: a
first-seen copy of trusted content gets its key inserted in time, and an untrusted exec gets
EPERM (trustdb.first_seen, trustdb.first_seen_handler). For a scoped engine it marks only the
mounts of the confined task's own mount namespace, from `confine()` on; for a system-wide one,
every filesystem from `start()` on.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable
from types import TracebackType
from typing import Self

from trustdb import backends
from trustdb.abi import Mode
from trustdb.backends.interface import Backend, BackendError, EngineConfig, KeySink
from trustdb.first_seen import NO_INTERPRETERS, Interpreters, OpenTrust
from trustdb.first_seen_handler import FirstSeenHandler, HandlerConfig, HandlerError

Prepare = Callable[[Backend], "OpenTrust | None"]
"""Runs once the programs are loaded and before they attach: fill the trusted-inode map (the
mirror's first sync) and return how the first-seen handler opens the database, if any.
Attaching first would deny everything in scope until the map is full: on a system-wide
engine, every exec on the machine."""


class Engine:
    def __init__(
        self,
        config: EngineConfig,
        *,
        backend: str | Backend | backends.BackgroundLoad | None = None,
        first_seen: OpenTrust | None = None,
        prepare: Prepare | None = None,
        allow_system_wide: bool = False,
        interpreters: Interpreters = NO_INTERPRETERS,
        db_option: str = "",
    ) -> None:
        """`backend`: a name (`--backend`), an instance, None for the strongest the kernel
        accepts, or a load already under way (backends.BackgroundLoad, made with `config`).
        `allow_system_wide` must be set to enforce on the whole machine (service mode): a
        scope-less config is refused otherwise, so a test can never do it by mistake."""
        if config.scope.system_wide and not allow_system_wide:
            raise BackendError("refusing system-wide enforcement without allow_system_wide")
        self.config = config
        self._choice = backend
        self._first_seen = first_seen
        self._prepare = prepare
        self._interpreters = interpreters
        self._db_option = db_option
        self._backend: Backend | None = None
        self._handler: FirstSeenHandler | None = None
        self.first_seen_warning = ""
        """Why no first-seen handler runs for a confined task (it shares our mounts)."""

    # ---- life cycle

    def start(self) -> None:
        if self._backend is not None:
            return
        given = isinstance(self._choice, Backend)
        if isinstance(self._choice, backends.BackgroundLoad):
            backend = self._choice.result()  # loaded on its thread with this same config
        elif isinstance(self._choice, Backend):
            backend = self._choice
        else:
            backend = backends.select_loaded(self._choice, self.config)  # loads each object once
        try:
            if given:
                backend.load(self.config)
            if self._prepare is not None:
                self._first_seen = self._prepare(backend) or self._first_seen
            if self._first_seen is not None:
                self._handler = self._new_handler(backend, self._first_seen)
                if self.config.scope.system_wide:
                    self._handler.start()
            backend.attach()
            if self._handler is not None and self._handler.pid:
                _vouch_by(backend, self._handler)
        except BaseException:
            self._stop_handler()
            backend.detach()
            raise
        self._backend = backend

    def _new_handler(self, backend: Backend, open_trust: OpenTrust) -> FirstSeenHandler:
        is_confined = getattr(backend, "is_confined", None)
        return FirstSeenHandler(HandlerConfig(
            open_trust=open_trust,
            keys=backend.trusted_inodes,  # type: ignore[arg-type]
            is_confined=None if self.config.scope.system_wide else is_confined,
            enforce=self.config.mode == Mode.ENFORCE,
            enforce_for=_service_modes(backend, self.config),
            interpreters=self._interpreters,
            db_option=self._db_option,
            deny_trusted_writes=not self.config.scope.system_wide,
            events_fd=backend.events_fd,
            tree_cgroup="" if self.config.scope.system_wide else self.config.scope.cgroup_path,
        ))

    def stop(self, *, wait_for_handler: bool = True) -> None:
        """Detach everything (idempotent); `wait_for_handler`: see FirstSeenHandler.stop."""
        self._stop_handler(wait=wait_for_handler)
        backend, self._backend = self._backend, None
        if backend is not None:
            backend.detach()

    def _stop_handler(self, *, wait: bool = True) -> None:
        handler, self._handler = self._handler, None
        if handler is not None:
            if self._backend is not None and handler.group_fd >= 0:
                with contextlib.suppress(BackendError, AttributeError):
                    self._backend.vouch_by(0, -1)  # type: ignore[attr-defined]
            handler.stop(wait=wait)

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

    @property
    def first_seen(self) -> FirstSeenHandler | None:
        """The running first-seen handler (its denial lines and counters), if any."""
        h = self._handler
        return h if h is not None and h.pid else None

    def forget_dead_handler(self) -> bool:
        """True when the first-seen handler died: the BPF side forgets its group at once (its
        freed memory may hold another group soon) and the caller fails closed."""
        h = self._handler
        if h is None or not h.gone:
            return False
        if self._backend is not None:
            with contextlib.suppress(BackendError, AttributeError):
                self._backend.vouch_by(0, -1)  # type: ignore[attr-defined]
        return True

    def confine(self, pidfd: int) -> None:
        """Mark the task confined; the first time, the first-seen handler marks the mounts of
        its mount namespace (before the task runs anything, if it waits at a gate)."""
        self.backend.confine(pidfd)
        handler = self._handler
        if handler is not None and not handler.pid:
            try:
                handler.start(tree_pid=_pid_of(pidfd))
            except HandlerError as e:
                self.first_seen_warning = str(e)
            else:
                _vouch_by(self.backend, handler)

    def confine_pid(self, pid: int) -> None:
        """Confine by pid (racy if the pid can be reused: prefer `confine` with a pidfd held
        since the child was created)."""
        fd = os.pidfd_open(pid)
        try:
            self.confine(fd)
        finally:
            os.close(fd)


def _vouch_by(backend: Backend, handler: FirstSeenHandler) -> None:
    """Tell the BPF side which fanotify group's ignore marks vouch for verified content (a
    backend without that support, or a kernel that refuses the iterator, just goes without:
    a trusted file then asks again after a chmod, and may be killed if it races it)."""
    vouch = getattr(backend, "vouch_by", None)
    if vouch is None or handler.group_fd < 0:
        return
    with contextlib.suppress(BackendError):
        if vouch(handler.pid, handler.group_fd):
            handler.vouched()


def _pid_of(pidfd: int) -> int:
    with open(f"/proc/self/fdinfo/{pidfd}") as f:
        for line in f:
            if line.startswith("Pid:"):
                return int(line.split()[1])
    raise HandlerError(f"fd {pidfd} is not a pidfd")


def _service_modes(backend: Backend, config: EngineConfig) -> Callable[[int], bool] | None:
    """System-wide: the per-task mode the kernel's mode maps give (trustdb.service.modes)."""
    if not config.scope.system_wide or not hasattr(backend, "map"):
        return None
    from trustdb.service.modes import TaskModes

    try:
        return TaskModes(backend.map("mode_uids"), backend.map("mode_cgroups"),
                         config.mode).enforce_for
    except BackendError:
        return None
