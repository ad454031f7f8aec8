"""One engine session: the backend loaded and attached, the mirror filling its map, the ring
buffer of decisions, and the stderr line a person reads for each denial. `trustdb run`
(trustdb.supervisor) and `trustdb daemon` (trustdb.daemon) each hold one.
"""

from __future__ import annotations

import os
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Protocol, TextIO

from trustdb.abi import Hook, Verdict
from trustdb.backends.interface import Backend, BackendError, EngineConfig
from trustdb.closers import Closers
from trustdb.db import DEFAULT_DB
from trustdb.events import Decision
from trustdb.events.decision import REASON_TAMPER_MODE_MOVE

if TYPE_CHECKING:
    from trustdb.abi import Mode
    from trustdb.backends import BackgroundLoad
    from trustdb.first_seen import Interpreters, OpenTrust
    from trustdb.first_seen_handler import Denial as FirstSeenDenial
    from trustdb.mirror import Mirror
    from trustdb.model import InodeKey
    from trustdb.policy.model import ProgramRef

PRIME_COVERAGE = 0.9
"""`run` attaches on a map filled from the verification cache alone when the cache holds at
least this share of the database's entries (else it walks the database first)."""

REFRESH_INTERVAL_S = 1.0
"""How often the mirror checks the DB generation (a `trustdb trust` from outside shows up)."""


def prime_or_sync(mirror: Mirror, entries: int) -> bool:
    """Fill `mirror`'s sink before an attach: from the verification cache alone
    (`Mirror.prime`) when it covers PRIME_COVERAGE of the `entries`, and True (the walk that
    reconciles it must follow the attach); else by the walk itself (`Mirror.sync`), False. A
    first start walks first, as the first-seen path would otherwise hash every exec's file."""
    from trustdb.system_trees import system_devices

    if mirror.prime(system_devices()) >= PRIME_COVERAGE * entries:
        return True
    mirror.sync()
    return False


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

    def handler_fileno(self) -> int | None:
        """The first-seen handler's report pipe, if one runs."""
        ...

    def pump(self) -> None:
        """Deliver waiting decisions to the consumers; follow database changes."""
        ...

    def close(self) -> None: ...


CachedDigest = Callable[[str], "bytes | None"]
"""A path -> the BLAKE3 the database's verification cache holds for its current inode, if any."""

InterpretersFrom = Callable[[CachedDigest], "Interpreters"]
"""Builds the interpreter rules once the database is open (their digests from its cache)."""

EngineFactory = Callable[[EngineConfig, Path, str | None, Callable[[Decision], None]], Engine]
"""(config, db path, backend name or None for the strongest, consumer of decisions) -> Engine,
loaded and attached."""


WRITE_TRUSTED = "write_trusted"
"""Reason of a write open of trusted content refused by the first-seen handler."""
INLINE_CODE = "inline_code"
"""Reason of inline code refused by the policy's deny_inline (trustdb.inline_code)."""

# --- what a person reads on stderr ------------------------------------------------------------

_HOOK_WORDS = {
    Hook.EXEC: "exec",
    Hook.MMAP: "executable mapping",
    Hook.MPROTECT: "mprotect(PROT_EXEC)",
    Hook.SCRIPT: "script load (by an interpreter)",
    Hook.WRITE: "write to code",
}
# Why, for the reasons that are not "this content is not trusted" (abi.Reason names, lowered).
_REASON_WORDS = {
    "writable": "it has writers (open for writing or mapped shared-writable), or it is code",
    "anon_exec": "code the process wrote itself (anonymous executable memory, W+X, an "
                 "executable stack); only a program allowed as a JIT may",
    "unverifiable": "the mapping could not be inspected (denied, failing closed)",
    "proc_mem": "/proc/PID/mem is not writable inside the tree",
    "inline_code": "the policy refuses inline code (-c, -e, stdin) for this interpreter "
                   "(deny_inline); put the code in a trusted file",
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
        if d.reason == REASON_TAMPER_MODE_MOVE:
            return (f"trustdb: {who} (uid {d.uid}) was moved by {d.path or '?'} into "
                    f"{d.mode_rule}, whose mode is audit: its untrusted code will be logged, "
                    "not denied")
        if d.hook == Hook.TAMPER:
            what = d.reason.removeprefix("tamper_").replace("_", " ")
            return f"trustdb: killed {who}: tried to lift its confinement ({what})"
        rule = d.mode_rule
        if d.verdict == Verdict.DENY:
            verb = f"denied ({rule}: enforce)" if rule else "denied"
        else:
            verb = f"would deny (audit: {rule})" if rule else "would deny (audit)"
        if d.reason == WRITE_TRUSTED:
            return (f"trustdb: {verb} write open of {d.path} ({who}): its content is trusted, "
                    "and trusted files may not be modified inside trustdb run")
        hook = _HOOK_WORDS.get(d.hook, d.hook.name.lower())
        if d.reason == INLINE_CODE:
            hook = "inline code"
        path = d.path or f"inode {d.dev >> 20}:{d.dev & 0xFFFFF}/{d.ino}"
        is_command = self.command and d.hook == Hook.EXEC and (
            path == self.command or (d.tgid == self.command_pid and
                                     os.path.basename(self.command) == os.path.basename(path)))
        if is_command:
            path = self.command
        if d.reason in _REASON_WORDS:
            where = path if d.path or d.ino else "memory"
            return f"trustdb: {verb} {hook} of {where} ({who}): {_REASON_WORDS[d.reason]}."
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

    def __init__(self, config: EngineConfig, db: Path, backend: str | BackgroundLoad | None,
                 consume: Callable[[Decision], None], *, allow_system_wide: bool = False,
                 interpreters: Interpreters | InterpretersFrom | None = None,
                 programs: Sequence[tuple[ProgramRef, int]] = (),
                 defer_reconcile: bool = False) -> None:
        """`defer_reconcile`: the walk that reconciles a primed map starts at `tree_started`
        (or the first `pump`), not at the end of this constructor (`trustdb run`)."""
        from trustdb import events
        from trustdb.db import TrustDB
        from trustdb.dbrecords import DatabaseError
        from trustdb.engine import Engine as BackendEngine
        from trustdb.first_seen import NO_INTERPRETERS
        from trustdb.libbpf import LibbpfError, RingBuffer

        self._closers = Closers()
        self.wait_for_handler = True
        """Whether close() waits for the first-seen handler's exit (see FirstSeenHandler.stop:
        `trustdb run`, leaving right after, does not)."""
        self._next_refresh = 0.0
        self._overflow_told = 0
        self._config = config
        self._db_path = db
        self._programs = programs
        """The policy's JITs and interpreters, flagged in the kernel after the first sync."""
        try:
            try:
                self._db = TrustDB.open(db, write=True)
            except DatabaseError as e:
                raise SupervisorError(f"trust database {db}: {e}") from e
            self._closers.append(self._db.close)
            if config.max_entries is None:  # the kernel map, sized from the database
                from trustdb.mirror import map_size_for

                config = replace(config, max_entries=map_size_for(self._db.entry_count()))
                self._config = config
            self._start_first_sync()
            if callable(interpreters):
                interpreters = interpreters(self._cached_digest)
            self._engine = BackendEngine(config, backend=backend, prepare=self._prepare,
                                         allow_system_wide=allow_system_wide,
                                         db_option="" if db == DEFAULT_DB else f" --db {db}",
                                         interpreters=interpreters or NO_INTERPRETERS)
            self._closers.append(lambda: self._engine.stop(
                wait_for_handler=self.wait_for_handler))
            self._engine.start()
            self._defer_reconcile = defer_reconcile
            if not defer_reconcile:
                self._start_reconcile()
            try:
                self._logger = events.Logger.create("file")
            except OSError:
                self._logger = events.Logger.create("null")
            self._closers.append(self._logger.close)
            consumers = [self._logger.log, consume]
            if isinstance(consume, DenialReporter) and not config.scope.system_wide:
                from trustdb.denial_stderr import tree_stderr_consumer

                consumers.append(tree_stderr_consumer(consume.line, config.scope.cgroup_path,
                                                      self._tell_handler))
            self._sink = events.EventSink(self._engine.backend_name, *consumers)
            try:
                self._ring = RingBuffer(self._engine.events_fd, self._on_sample)
            except LibbpfError as e:
                raise BackendError(f"ring buffer: {e}") from e
            self._closers.append(self._ring.close)
        except BaseException:
            self.close()
            if backend is not None and not isinstance(backend, str):
                backend.discard()  # a BackgroundLoad the engine did not take (it detaches those)
            raise

    def _prepare(self, backend: Backend) -> OpenTrust:
        """Between load and attach: protect the database (lsm, runs only), fill the map, and
        tell the first-seen handler how to open the database (read-only, after its fork)."""
        import functools

        from trustdb.db import TrustDB

        protect = getattr(backend, "protect_database", None)
        if protect is not None and not self._config.scope.system_wide:
            protect(self._db_path)  # lsm: the kernel itself refuses the confined tree any DB change
        self._first_sync.join()
        if self._first_sync.error is not None:
            raise self._first_sync.error
        self._buffer.attach(backend.trusted_inodes)
        if self._programs:
            flags = self._program_flags
            set_flags = getattr(backend, "set_program_flags", None)  # bpfobject backends
            try:
                if set_flags is None:
                    raise BackendError("no program flags")
                if flags:
                    set_flags(flags)
            except Exception as e:  # noqa: BLE001 - fails closed: unflagged JITs stay refused
                print(f"trustdb: {backend.name}: JIT and interpreter programs not flagged in the "
                      f"kernel ({e}); anonymous executable memory stays refused to all",
                      file=sys.stderr)
        return functools.partial(TrustDB.open, self._db_path)

    def _start_first_sync(self) -> None:
        """The mirror's first fill runs on a thread while the engine loads the BPF object (the
        kernel verifier, GIL released); its keys wait in a buffer until the map exists
        (`_prepare`). Nothing attaches before that.

        The fill is `Mirror.prime` (the verification cache alone: no stat, no path) when the
        cache covers the database; the walk that reconciles it (`Mirror.sync`) then runs after
        the attach (`_start_reconcile`), off the start's critical path. A first run (a cache
        that covers less than PRIME_COVERAGE of the entries) walks before the attach, as the
        first-seen path would otherwise hash the whole command's closure exec by exec."""
        from trustdb.mirror import Mirror
        from trustdb.mirrorsource import BufferedKeySink

        self._buffer = BufferedKeySink()
        self._mirror = Mirror(self._db, self._buffer)
        self._walk_after_attach = False
        self._reconcile: _MirrorThread | None = None
        entries = self._db.entry_count()
        self._program_flags: list[tuple[InodeKey, int]] = []

        def first_fill() -> None:
            self._walk_after_attach = prime_or_sync(self._mirror, entries)
            if self._programs:  # from the same mirror state, while the object still loads
                from trustdb.confine.programs import resolve_program_flags

                self._program_flags = resolve_program_flags(
                    self._programs, self._mirror,
                    lambda m: print(f"trustdb: {m}", file=sys.stderr))

        self._first_sync = _MirrorThread("first-sync", first_fill)
        self._closers.append(self._first_sync.join)  # never close the database under it

    def tree_started(self) -> None:
        """The confined tree was let go (`trustdb run`): start the deferred reconcile walk. Up
        to here it would have competed for the GIL with the start's last steps (the handler's
        fork, the confinement mark, the gate), and a thread of ours would have run across the
        first-seen handler's fork."""
        if self._defer_reconcile:
            self._defer_reconcile = False
            self._start_reconcile()

    def _start_reconcile(self) -> None:
        """After the attach (and the first-seen handler's fork: no thread of ours runs across a
        fork), walk the database once to reconcile the primed map (`Mirror.sync`); the refreshes
        wait for it (`pump`)."""
        if not self._walk_after_attach:
            return
        self._reconcile = _MirrorThread("mirror-walk", self._mirror.sync)
        self._closers.append(self._reconcile.join)  # never close the database under it
        self._closers.append(self._mirror.cancel)  # first: the command ended, stop walking

    def _cached_digest(self, path: str) -> bytes | None:
        from trustdb.model import InodeKey

        try:
            st = os.stat(path)
        except OSError:
            return None
        cached = self._db.digest_cache().lookup(InodeKey.from_stat(st), st.st_size)
        return cached.blake3 if cached is not None else None

    def _tell_handler(self, d: Decision, line: str) -> bool:
        """A BPF denial's line for the denied task's own stderr (trustdb.held_stderr)."""
        handler = self._engine.first_seen
        return handler is not None and handler.tell(d, line)

    def _on_sample(self, data: bytes) -> None:
        self._sink.on_sample(data)

    @property
    def backend_name(self) -> str:
        return self._engine.backend_name

    def confine(self, pidfd: int) -> None:
        self._engine.confine(pidfd)

    def fileno(self) -> int:
        return self._ring.epoll_fd

    def handler_fileno(self) -> int | None:
        """Readable when the first-seen handler has denials to report, or has died."""
        handler = self._engine.first_seen
        return handler.fileno() if handler is not None else None

    def pump(self) -> None:
        self.tree_started()  # a caller that never said so still gets its walk
        self._ring.consume()
        handler = self._engine.first_seen
        for denial in handler.denials() if handler is not None else ():
            decision = _first_seen_decision(denial, self._config.mode, self._engine.backend_name)
            for consume in self._sink.consumers:
                try:
                    consume(decision)
                except Exception:  # noqa: BLE001 - as EventSink: keep delivering
                    self._sink.failures += 1
        if self._engine.forget_dead_handler():
            # Fail closed: without it scripts and first-seen copies go unjudged; the
            # supervisor's cleanup kills the tree.
            raise SupervisorError("the first-seen handler died: the tree is stopped")
        if self._reconcile is not None:
            if self._reconcile.is_alive():
                return  # one sync at a time: the walk after the attach applies what changed
            error, self._reconcile = self._reconcile.error, None
            if error is not None:
                raise error
        now = time.monotonic()
        if now >= self._next_refresh:
            self._next_refresh = now + REFRESH_INTERVAL_S
            self._mirror.refresh()
            if self._mirror.overflow > self._overflow_told:
                # Sized at the start from the database; it grew past that since.
                self._overflow_told = self._mirror.overflow
                print(f"trustdb: the kernel's trusted-inode map is full ({self._config.max_entries}"
                      f" entries): {self._overflow_told} files trusted since this run started "
                      "are denied; start the run again to size the map for the database",
                      file=sys.stderr, flush=True)

    def close(self) -> None:
        self._closers.close()


class _MirrorThread:
    """One mirror fill on a thread of its own; what it raised is re-raised by its owner, on the
    owner's thread (`error`, read after `join`)."""

    def __init__(self, name: str, work: Callable[[], object]) -> None:
        import threading

        self.error: BaseException | None = None
        self._work = work
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        try:
            self._work()
        except BaseException as e:  # noqa: BLE001 - re-raised by the owner
            self.error = e

    def is_alive(self) -> bool:
        return self._thread.is_alive()

    def join(self) -> None:
        self._thread.join()


def _first_seen_decision(d: FirstSeenDenial, mode: Mode, backend: str) -> Decision:
    """A denial the fanotify handler answered (EPERM before the kernel's check), as a
    Decision for the log and the stderr reporter."""
    import datetime as dt

    from trustdb.abi import Hook

    return Decision(
        time=dt.datetime.now(dt.UTC), pid=d.tgid, tgid=d.tgid, ppid=0, uid=0,
        comm=os.path.basename(d.path)[:15], path=d.path, dev=d.dev, ino=d.ino,
        hook=Hook.SCRIPT if d.what in ("script", "inline") else Hook.EXEC,
        verdict=Verdict.DENY if d.denied else Verdict.AUDIT_DENY, mode=mode,
        backend=f"{backend}+fanotify",
        reason={"exec": "untrusted_exec", "write": WRITE_TRUSTED,
                "inline": INLINE_CODE}.get(d.what, "untrusted_script"),
        exe=d.path)


def default_engine(
    config: EngineConfig, db: Path, backend: str | None, consume: Callable[[Decision], None],
    *, programs: Sequence[tuple[ProgramRef, int]] = (),
    interpreters: Interpreters | InterpretersFrom | None = None,
    loading: BackgroundLoad | None = None,
) -> Engine:
    """`loading`: the backend already loading with this `config` (trustdb.supervisor)."""
    return EngineSession(config, db, loading or backend, consume, programs=programs,
                         interpreters=interpreters, defer_reconcile=True)


def daemon_engine(
    config: EngineConfig, db: Path, backend: str | None, consume: Callable[[Decision], None]
) -> Engine:
    """The only engine allowed to enforce on the whole machine (the service)."""
    return EngineSession(config, db, backend, consume, allow_system_wide=True)
