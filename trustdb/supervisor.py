"""The supervising process of `trustdb run` (and the loop of `trustdb daemon`).

`run` owns, for the life of one command: a cgroup (trustdb.confine), the engine (BPF programs
scoped to that cgroup, the mirror filling their map, the ring buffer of decisions), and the
confined child. The order matters and is the whole design:

1. create the cgroup, and fork the reaper that removes it whatever way we end;
2. fork the child (init of a new PID namespace, in the cgroup, its mount namespace built), which
   waits at a gate; it is forked before any BPF object exists, so it inherits no BPF fd;
3. load the engine, fill the map, attach; mark the child confined through its pidfd;
4. open the gate: the child installs seccomp and exec's CMD, the first thing judged;
5. until CMD ends: report each denial on stderr, log every decision, follow DB changes;
6. on every exit path: kill and remove the cgroup, detach (closing our fds is enough: nothing
   is pinned, so even SIGKILL of this process removes every program).

Never fail open: the child has PR_SET_PDEATHSIG(SIGKILL) and is its namespace's init, so if this
process dies, the confined tree dies with it.
"""

from __future__ import annotations

import os
import select
import shlex
import signal
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import FrameType
from typing import TYPE_CHECKING, Protocol, TextIO

from trustdb import confine
from trustdb.abi import Hook, Mode, Verdict
from trustdb.backends.interface import Backend, BackendError, EngineConfig, Scope
from trustdb.db import DEFAULT_DB
from trustdb.events import Decision

if TYPE_CHECKING:
    from trustdb.engine import Prewarm

KILL_GRACE_S = 2.0
"""After forwarding SIGINT/SIGTERM, how long CMD gets before the tree is killed. CMD is the init
of its PID namespace, and an init ignores every signal it has no handler for."""
REFRESH_INTERVAL_S = 1.0
"""How often the mirror checks the DB generation (a `trustdb trust` from outside shows up)."""


class SupervisorError(Exception):
    """`trustdb run` / `trustdb daemon` could not start (one line)."""


class Engine(Protocol):
    """What the supervisor needs from the engine stage (trustdb.engine)."""

    @property
    def backend_name(self) -> str: ...

    def confine(self, pidfd: int) -> None: ...

    def fileno(self) -> int:
        """Readable when decisions are waiting."""
        ...

    def pump(self) -> None:
        """Deliver waiting decisions to the consumers; follow database changes."""
        ...

    def close(self) -> None: ...


EngineFactory = Callable[[EngineConfig, Path, str | None, Callable[[Decision], None]], Engine]
"""(config, db path, backend name or None for the strongest, consumer of decisions) -> Engine,
loaded and attached."""


# --- what a person reads on stderr ------------------------------------------------------------

_HOOK_WORDS = {
    Hook.EXEC: "exec",
    Hook.MMAP: "executable mapping",
    Hook.MPROTECT: "mprotect(PROT_EXEC)",
}


@dataclass
class DenialReporter:
    """Turns denials into one stderr line each, with the command that would trust the file."""

    db: Path
    command: str = ""
    """The resolved CMD: a denial of it means CMD itself is not trusted."""
    command_pid: int = 0
    """The host pid of the confined init: its first exec is CMD."""
    out: TextIO = field(default_factory=lambda: sys.stderr)
    seen: set[tuple[int, int, int]] = field(default_factory=set)
    count: int = 0

    def __call__(self, d: Decision) -> None:
        if not d.denied:
            return
        key = (d.tgid, d.dev, d.ino) if d.hook != Hook.TAMPER else (d.tgid, -1, hash(d.reason))
        if key in self.seen:  # one line per (process, file): a library mapped twice is one
            return
        self.seen.add(key)
        self.count += 1
        print(self.line(d), file=self.out, flush=True)

    def line(self, d: Decision) -> str:
        who = f"pid {d.tgid}, comm {d.comm}"
        if d.hook == Hook.TAMPER:
            what = d.reason.removeprefix("tamper_").replace("_", " ")
            return f"trustdb: killed {who}: tried to lift its confinement ({what})"
        verb = "denied" if d.verdict == Verdict.DENY else "would deny (audit)"
        hook = _HOOK_WORDS.get(d.hook, d.hook.name.lower())
        path = d.path or f"inode {d.dev >> 20}:{d.dev & 0xFFFFF}/{d.ino}"
        is_command = self.command and d.hook == Hook.EXEC and (
            path == self.command or (d.tgid == self.command_pid and
                                     os.path.basename(self.command) == os.path.basename(path)))
        if is_command:
            path = self.command
        text = f"trustdb: {verb} {hook} of {path} ({who}): not in the trust database."
        if is_command:
            text += " It is the command you asked to run: it must be trusted itself."
        db = "" if self.db == DEFAULT_DB else f" --db {self.db}"
        if path.startswith("/"):
            text += f" To trust it: trustdb trust{db} {path}"
        elif d.ino:
            text += (f" To trust it: trustdb trust{db} PATH, where PATH is the file with inode "
                     f"{d.ino} on device {d.dev >> 20}:{d.dev & 0xFFFFF}")
        return text


# --- the engine, assembled from the stages -----------------------------------------------------


class EngineSession:
    """Engine + mirror + decision log. `engine.Engine` keeps the order that never denies by
    accident (load, fill the map from the database, then attach); this adds the database, the
    mirror's refreshes and the ring buffer. Closing releases every fd: nothing is pinned."""

    def __init__(self, config: EngineConfig, db: Path, backend: str | None,
                 consume: Callable[[Decision], None], *, allow_system_wide: bool = False) -> None:
        from trustdb import events
        from trustdb.db import DatabaseError, TrustDB
        from trustdb.engine import Engine as BackendEngine
        from trustdb.libbpf import LibbpfError, RingBuffer

        self._closers: list[Callable[[], None]] = []
        self._next_refresh = 0.0
        self._config = config
        self._db_path = db
        try:
            try:
                self._db = TrustDB.open(db, write=True)
            except DatabaseError as e:
                raise SupervisorError(f"trust database {db}: {e}") from e
            self._closers.append(self._db.close)
            self._engine = BackendEngine(config, backend=backend, prepare=self._prepare,
                                         allow_system_wide=allow_system_wide)
            self._closers.append(self._engine.stop)
            self._engine.start()
            try:
                self._logger = events.Logger.create("file")
            except OSError:
                self._logger = events.Logger.create("null")
            self._closers.append(self._logger.close)
            self._sink = events.EventSink(self._engine.backend_name, self._logger.log, consume)
            try:
                self._ring = RingBuffer(self._engine.events_fd, self._on_sample)
            except LibbpfError as e:
                raise BackendError(f"ring buffer: {e}") from e
            self._closers.append(self._ring.close)
        except BaseException:
            self.close()
            raise

    def _prepare(self, backend: Backend) -> Prewarm:
        """Between load and attach: protect the database (lsm, runs only), fill the map, and
        hand the mirror's first-seen check to the exec pre-warm."""
        from trustdb.mirror import Mirror

        protect = getattr(backend, "protect_database", None)
        if protect is not None and not self._config.scope.system_wide:
            protect(self._db_path)  # lsm: the kernel itself refuses the confined tree any DB change
        self._mirror = Mirror(self._db, backend.trusted_inodes)
        self._mirror.sync()
        return self._mirror.verify_file

    def _on_sample(self, data: bytes) -> None:
        self._sink.on_sample(data)

    @property
    def backend_name(self) -> str:
        return self._engine.backend_name

    def confine(self, pidfd: int) -> None:
        self._engine.confine(pidfd)

    def fileno(self) -> int:
        return self._ring.epoll_fd

    def pump(self) -> None:
        self._ring.consume()
        now = time.monotonic()
        if now >= self._next_refresh:
            self._next_refresh = now + REFRESH_INTERVAL_S
            self._mirror.refresh()

    def close(self) -> None:
        while self._closers:
            closer = self._closers.pop()
            try:
                closer()
            except Exception as e:  # noqa: BLE001 - the next closer must still run
                print(f"trustdb: cleanup: {e}", file=sys.stderr)


def default_engine(
    config: EngineConfig, db: Path, backend: str | None, consume: Callable[[Decision], None]
) -> Engine:
    return EngineSession(config, db, backend, consume)


def daemon_engine(
    config: EngineConfig, db: Path, backend: str | None, consume: Callable[[Decision], None]
) -> Engine:
    """The only engine allowed to enforce on the whole machine (the service)."""
    return EngineSession(config, db, backend, consume, allow_system_wide=True)


# --- run ----------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class RunOptions:
    argv: Sequence[str]
    db: Path = DEFAULT_DB
    mode: Mode = Mode.ENFORCE
    backend: str | None = None
    read_only: Sequence[str] = ()
    """More paths the confined tree may read but not write (besides the defaults)."""


class _Signals:
    """Forward SIGINT/SIGTERM/SIGHUP to CMD; a second one, or CMD ignoring the first for
    KILL_GRACE_S, kills the tree."""

    FORWARDED = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP, signal.SIGQUIT)

    def __init__(self) -> None:
        self.child: confine.ConfinedChild | None = None
        self.received: int = 0
        self.kill_at: float | None = None
        self._old: dict[int, object] = {}

    def install(self) -> None:
        for sig in self.FORWARDED:
            self._old[sig] = signal.signal(sig, self._handle)

    def restore(self) -> None:
        for sig, old in self._old.items():
            signal.signal(sig, old)  # type: ignore[arg-type]

    def _handle(self, sig: int, frame: FrameType | None) -> None:
        first = not self.received
        self.received = sig
        if self.child is None:  # not started yet: unwind through the cleanup
            raise KeyboardInterrupt
        if first:
            try:
                signal.pidfd_send_signal(self.child.pidfd, sig)
            except ProcessLookupError:
                pass
            self.kill_at = time.monotonic() + KILL_GRACE_S
        else:
            self.kill_at = time.monotonic()


def run(options: RunOptions, *, engine_factory: EngineFactory = default_engine,
        stderr: TextIO | None = None) -> int:
    """Run one command confined; returns its exit status."""
    if os.geteuid() != 0:
        raise SupervisorError("trustdb run needs root (it loads BPF programs)")
    db = options.db.resolve()
    if not db.is_dir():
        raise SupervisorError(f"no trust database at {db} (create one with `trustdb trust`)")
    reporter = DenialReporter(db=db, out=stderr or sys.stderr)
    _sweep_stale_cgroups()
    signals = _Signals()
    signals.install()
    cgroup = confine.RunCgroup.create()
    child: confine.ConfinedChild | None = None
    engine: Engine | None = None
    released = False
    try:
        confine.start_watcher(cgroup)
        plan = confine.MountPlan.for_run(db, [*_log_dirs(), *options.read_only])
        child = confine.spawn(options.argv, cgroup, plan)
        reporter.command = confine.resolve_command(options.argv, dict(os.environ))
        reporter.command_pid = child.pid
        config = EngineConfig(
            mode=options.mode,
            scope=Scope.for_cgroup(cgroup.path),
            supervisor_tgid=os.getpid(),
        )
        engine = engine_factory(config, db, options.backend, reporter)
        publish_state(EngineState(os.getpid(), "run", engine.backend_name,
                                  options.mode.name.lower(), str(cgroup.path),
                                  shlex.join(options.argv)))
        engine.confine(child.pidfd)
        signals.child = child
        child.release()
        released = True
        return _supervise(child, engine, signals)
    except BackendError as e:
        raise SupervisorError(str(e)) from e
    except confine.ConfineError as e:
        raise SupervisorError(str(e)) from e
    finally:
        if child is not None:
            if not released:
                child.abort()
            child.close()
        try:
            cgroup.remove()
        finally:
            if engine is not None:
                engine.close()
                withdraw_state(os.getpid())
            signals.restore()


def _supervise(child: confine.ConfinedChild, engine: Engine, signals: _Signals) -> int:
    wake_r, wake_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
    old_wakeup = signal.set_wakeup_fd(wake_w)  # a signal ends the poll at once
    try:
        return _supervise_loop(child, engine, signals, wake_r)
    finally:
        signal.set_wakeup_fd(old_wakeup)
        os.close(wake_r)
        os.close(wake_w)


def _supervise_loop(child: confine.ConfinedChild, engine: Engine, signals: _Signals,
                    wake: int) -> int:
    poller = select.poll()
    poller.register(child.pidfd, select.POLLIN)
    poller.register(engine.fileno(), select.POLLIN)
    poller.register(wake, select.POLLIN)
    while True:
        timeout = REFRESH_INTERVAL_S
        if signals.kill_at is not None:
            timeout = max(0.0, min(timeout, signals.kill_at - time.monotonic()))
            if timeout == 0.0:
                _kill(child)
        ready = {fd for fd, _ in poller.poll(int(timeout * 1000))}
        if wake in ready:
            while os.read(wake, 512) == 512:
                pass
        engine.pump()
        if child.pidfd in ready:
            break
    status = child.wait()
    engine.pump()  # the decisions that explain why CMD died
    if signals.received and status == 128 + signal.SIGKILL:
        return 128 + signals.received
    return status


def _sweep_stale_cgroups() -> None:
    """Remove the cgroups of runs whose supervisor and reaper were both killed."""
    for path in confine.stale_cgroups():
        try:
            confine.RunCgroup(path=path, id=path.stat().st_ino).remove(timeout=1.0)
        except (OSError, confine.ConfineError):
            continue


def _kill(child: confine.ConfinedChild) -> None:
    try:
        signal.pidfd_send_signal(child.pidfd, signal.SIGKILL)
    except ProcessLookupError:
        pass


def _log_dirs() -> list[str]:
    """The decision log directory: the confined tree may read it, never rewrite it."""
    from trustdb import events

    return [str(events.default_log_path().parent)]


# --- daemon -------------------------------------------------------------------------------------


def daemon(*, db: Path, mode: Mode, backend: str | None,
           engine_factory: EngineFactory = daemon_engine, stderr: TextIO | None = None) -> int:
    """System-wide enforcement until SIGTERM/SIGINT (the service: only a user starts it)."""
    if os.geteuid() != 0:
        raise SupervisorError("trustdb daemon needs root (it loads BPF programs)")
    out = stderr or sys.stderr
    stop: list[int] = []

    def _stop(sig: int, frame: FrameType | None) -> None:
        stop.append(sig)

    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, _stop)
    reporter = DenialReporter(db=db.resolve(), out=out)
    config = EngineConfig(mode=mode, scope=Scope(), supervisor_tgid=os.getpid())
    try:
        engine = engine_factory(config, db.resolve(), backend, reporter)
    except BackendError as e:
        raise SupervisorError(str(e)) from e
    publish_state(EngineState(os.getpid(), "daemon", engine.backend_name, mode.name.lower(),
                              "system-wide"))
    print(f"trustdb: enforcing system-wide ({mode.name.lower()}) with the "
          f"{engine.backend_name} backend", file=out, flush=True)
    try:
        poller = select.poll()
        poller.register(engine.fileno(), select.POLLIN)
        while not stop:
            poller.poll(int(REFRESH_INTERVAL_S * 1000))
            engine.pump()
    finally:
        engine.close()
        withdraw_state(os.getpid())
    return 0


# --- what is running, for `trustdb status` and `trustdb backends` --------------------------------

STATE_DIR = Path(os.environ.get("TRUSTDB_RUN_DIR", "/run/trustdb"))
"""One JSON file per running engine (`<pid>.json`), removed when it stops; a file whose pid is
gone is stale (the process was killed) and is ignored and removed."""


@dataclass(frozen=True, slots=True)
class EngineState:
    pid: int
    kind: str
    """`run` or `daemon`."""
    backend: str
    mode: str
    scope: str
    """The cgroup path, or `system-wide`."""
    command: str = ""

    def to_dict(self) -> dict[str, object]:
        return {"pid": self.pid, "kind": self.kind, "backend": self.backend,
                "mode": self.mode, "scope": self.scope, "command": self.command}


def _state_path(pid: int) -> Path:
    return STATE_DIR / f"{pid}.json"


def publish_state(state: EngineState) -> None:
    import json

    try:
        STATE_DIR.mkdir(mode=0o755, parents=True, exist_ok=True)
        tmp = STATE_DIR / f".{state.pid}.tmp"
        tmp.write_text(json.dumps(state.to_dict()))
        tmp.replace(_state_path(state.pid))
    except OSError:
        pass  # status is a convenience; never fail a run for it


def withdraw_state(pid: int) -> None:
    try:
        _state_path(pid).unlink()
    except OSError:
        pass


def running_engines() -> list[EngineState]:
    import json

    found = []
    for p in sorted(STATE_DIR.glob("*.json")):
        try:
            d = json.loads(p.read_text())
            state = EngineState(**d)
        except (OSError, ValueError, TypeError):
            continue
        if Path(f"/proc/{state.pid}").exists():
            found.append(state)
        else:
            withdraw_state(state.pid)
    return found


def describe(s: EngineState) -> str:
    scope = s.scope if s.kind == "daemon" else f"cgroup {s.scope}: {s.command}"
    return f"{s.mode} with the {s.backend} backend, {scope}"


@dataclass(frozen=True, slots=True)
class BackendRow:
    name: str
    ok: bool
    reason: str
    selected: bool
    guarantees: str = ""

    def to_dict(self) -> dict[str, object]:
        return {"name": self.name, "ok": self.ok, "reason": self.reason,
                "selected": self.selected, "guarantees": self.guarantees}


def probe_backends() -> list[BackendRow]:
    """Every compiled-in backend, strongest first, probed on this kernel; the first that works
    is the one `run` and `daemon` pick by default."""
    from trustdb import backends

    rows = []
    chosen = False
    for cls in sorted(backends.COMPILED, key=lambda b: -b.strength):
        probe = cls().probe()
        rows.append(BackendRow(cls.name, probe.ok, probe.reason, probe.ok and not chosen,
                               getattr(cls, "guarantees", "")))
        chosen = chosen or probe.ok
    return rows
