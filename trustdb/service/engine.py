"""The service's engine: system-wide enforcement whose BPF state outlives the daemon (pins.py).

Start-up takes one of two roads:
- **adopt**: pins from the same backend, mode and BPF object are there (a restart after a crash,
  kill -9, OOM kill or upgrade of the Python side). New fds for the pinned maps, the mirror takes
  the map's keys as its own (read 8192 per bpf() call), and a walk of the database on a thread
  tells which path gave which key and applies what changed meanwhile (keys already in the map
  stay: only differences are written). Nothing is loaded and nothing is detached: no gap.
- **fresh**: load the object, fill the map (from the verification cache alone when it covers
  the database, `session.prime_or_sync`, the walk following on a thread after the attach; else
  by the walk itself), attach (trustdb.engine.Engine keeps that order), pin, record, and only
  then remove older pins (another mode or object).

**Growing**: a pinned map cannot be resized, and a loaded program keeps the map it was loaded
with. When the database outgrows the map (`grow_if_needed`, after each refresh), the fresh road
is taken again in this process with a map sized for the database: the new programs are loaded,
their map filled, attached and pinned while the old ones still decide, and only then are the
old pins removed and the old fds closed. Both sets deny what their map lacks, so there is no
moment without enforcement.

Either way the first-seen handler (a forked fanotify process: a copy of trusted content gets
its key, an untrusted exec gets EPERM) and the decision ring buffer are this process's, and
closing releases only this process's fds: the pins stay until `trustdb service stop`, and
the pinned programs keep denying what the map does not hold.
"""

from __future__ import annotations

import dataclasses
import functools
import os
import sys
import time
from collections.abc import Callable
from pathlib import Path

from trustdb import backends
from trustdb.abi import CFirstSeenGroup, Mode
from trustdb.backends.bpfobject import BpfBackend, MapKeySink
from trustdb.backends.interface import Backend, BackendError, EngineConfig, KeySink
from trustdb.closers import Closers
from trustdb.db import TrustDB
from trustdb.dbrecords import DatabaseError
from trustdb.events import Decision
from trustdb.first_seen import NO_INTERPRETERS, OpenTrust
from trustdb.first_seen_handler import FirstSeenHandler, HandlerConfig, HandlerError
from trustdb.libbpf import RingBuffer
from trustdb.policy.model import ServiceRules
from trustdb.service.modes import MAP_NAMES as MODE_MAPS
from trustdb.service.modes import ModeMaps, ResolvedModes, TaskModes, resolve
from trustdb.service.pins import PinError, PinRecord, PinStore, object_sha256

MAP_ENTRIES_ENV = "TRUSTDB_MAP_ENTRIES"
"""The smallest trusted-inode map the service loads (default: what `map_size_for` gives)."""
from trustdb.session import SupervisorError, _MirrorThread


@dataclasses.dataclass(frozen=True, slots=True)
class StartReport:
    adopted: bool
    backend: str
    seconds: float
    """From the start of __init__ to enforcing (READY)."""
    resynced: bool
    """Whether the database had changed since the pins were last synced."""


def _backend_class(name: str) -> type[Backend]:
    for cls in backends.COMPILED:
        if cls.name == name:
            return cls
    raise BackendError(f"unknown backend {name!r} (known: {', '.join(backends.names())})")


class ServiceEngine:
    """What trustdb.daemon runs: the `session.Engine` protocol over pinned state."""

    def __init__(
        self,
        config: EngineConfig,
        db_path: Path,
        backend: str | None,
        consume: Callable[[Decision], None],
        *,
        pins: PinStore | None = None,
        trust_hook: Callable[[OpenTrust], OpenTrust] | None = None,
        modes: ServiceRules | None = None,
    ) -> None:
        """`trust_hook` wraps how the first-seen handler opens the database (trusted
        installers answer for what they are writing right now). `modes`: the policy's
        per-uid and per-cgroup modes (trustdb.service.modes), `config.mode` the default."""
        from trustdb import events
        from trustdb.dbrecords import DatabaseError

        started = time.monotonic()
        self._pins = pins or PinStore()
        self._config = config
        self._consume = consume
        self._trust_hook = trust_hook
        self._db_path = db_path
        self._handler: FirstSeenHandler | None = None
        self._reconcile: _MirrorThread | None = None
        self._pending_full = False
        """A SIGHUP's full re-sync asked for while the walk ran (done after it)."""
        """The database walk that follows a start on a primed or adopted map (below)."""
        self.handler_restarted = False
        """Set by `pump` when a dead handler was replaced (its fd changed: poll anew)."""
        self._closers = Closers()
        """The database and the loggers: for the life of this object."""
        self._engine_closers = Closers()
        """The loaded (or adopted) engine's fds: replaced when the map grows."""
        self._record: PinRecord | None = None
        self._modes = modes or ServiceRules()
        self._mode_maps: ModeMaps | None = None
        self._ring: RingBuffer | None = None
        self._sink: events.EventSink | None = None
        self.report: StartReport | None = None
        try:
            try:
                self._db = TrustDB.open(db_path, write=True)
            except DatabaseError as e:
                raise SupervisorError(f"trust database {db_path}: {e}") from e
            self._closers.append(self._db.close)
            if config.max_entries is None:
                # Sized from the database (with the headroom map_size_for leaves); past that
                # the engine is re-loaded with a larger map (grow_if_needed).
                from trustdb.mirror import map_size_for

                floor = int(os.environ.get(MAP_ENTRIES_ENV) or 0)
                size = max(floor, map_size_for(self._db.entry_count()))
                self._config = config = dataclasses.replace(config, max_entries=size)
            record = self._adoptable(backend)
            resynced = False
            events_fd = -1
            if record is not None:
                try:
                    events_fd, resynced = self._adopt(record)
                except PinError as e:  # half-removed pins: load a fresh engine over them
                    print(f"trustdb: {e}; loading a fresh engine", file=sys.stderr, flush=True)
                    record = None
            if record is None:
                events_fd = self._fresh(backend)
            try:
                self._logger = events.Logger.create("file")
            except OSError:
                self._logger = events.Logger.create("null")
            self._closers.append(self._logger.close)
            journal = events.Logger.create("journal")  # dropped where there is no journald
            self._closers.append(journal.close)
            assert self._record is not None
            self._sink = events.EventSink(self._record.backend, self._logger.log, journal.log,
                                          consume)
            self._open_ring(events_fd)
        except BaseException:
            self.close()
            raise
        self.report = StartReport(record is not None, self._record.backend,
                                  time.monotonic() - started, resynced)

    def _open_ring(self, events_fd: int) -> None:
        from trustdb.libbpf import LibbpfError

        assert self._sink is not None
        try:
            self._ring = RingBuffer(events_fd, self._sink.on_sample)
        except LibbpfError as e:
            raise BackendError(f"ring buffer: {e}") from e
        self._engine_closers.append(self._ring.close)

    # --- the two roads

    def _adoptable(self, backend: str | None) -> PinRecord | None:
        record = self._pins.current()
        if record is None:
            return None
        if backend is not None and backend != record.backend:
            return None
        if record.mode != self._config.mode.name.lower():
            return None
        try:
            cls = _backend_class(record.backend)
            path = cls().object_path  # type: ignore[attr-defined]
            if object_sha256(path) != record.object_sha256:
                return None  # the BPF object was upgraded: load the new one, then swap
        except (BackendError, OSError):
            return None
        return record

    def _adopt(self, record: PinRecord) -> tuple[int, bool]:
        from trustdb.mirror import Mirror

        maps = self._pins.open_maps(record, ("trusted_inodes", "events", *MODE_MAPS))
        for m in maps.values():
            self._engine_closers.append(functools.partial(os.close, m.fd))
        if maps["trusted_inodes"].max_entries:
            self._config = dataclasses.replace(
                self._config, max_entries=maps["trusted_inodes"].max_entries)
        sink = MapKeySink(maps["trusted_inodes"])
        self._mirror = Mirror(self._db, sink)
        self._mirror.adopt(record.generation, sink.keys())
        self._record = dataclasses.replace(record, daemon_pid=os.getpid())
        self._forget_vouching()  # the group named there was the last daemon's handler
        self._mode_maps = ModeMaps(maps["mode_uids"], maps["mode_cgroups"])
        self.apply_modes()
        self._start_handler(sink)
        # Enforcing already (the pinned programs never stopped): the walk that tells which
        # path gave which key, and applies what changed while no daemon ran, follows on a
        # thread (_start_reconcile), after the handler's fork.
        self._save()
        self._start_reconcile()
        return maps["events"].fd, record.generation != self._db.generation

    def _fresh(self, backend: str | None) -> int:
        from trustdb.engine import Engine

        engine = Engine(self._config, backend=backend, prepare=self._prepare,
                        allow_system_wide=True, db_option=self._db_option)
        engine.start()  # load (the load is the probe), fill the map, first-seen handler, attach
        self._engine_closers.append(engine.stop)  # our fds only: the pins hold the programs
        self._handler = engine.first_seen
        chosen = engine.backend
        if not isinstance(chosen, BpfBackend):
            raise BackendError(f"{chosen.name}: cannot be pinned")
        # Before the pins go up: a restart adopts the maps as they are.
        self._mode_maps = ModeMaps(chosen.map("mode_uids"), chosen.map("mode_cgroups"))
        self.apply_modes()
        try:
            instance, where = self._pins.new_instance()
            chosen.pin(where)
        except (PinError, BackendError) as e:
            raise SupervisorError(f"cannot pin the engine: {e}") from e
        self._record = PinRecord(
            instance=instance,
            backend=chosen.name,
            mode=self._config.mode.name.lower(),
            object_sha256=object_sha256(chosen.object_path),
            generation=self._mirror.generation or 0,
            pinned_at=time.time(),
            daemon_pid=os.getpid(),
        )
        self._save()
        self._pins.remove_others(keep=instance)
        if self._walk_after_attach:
            self._start_reconcile()
        return chosen.events_fd

    @property
    def _db_option(self) -> str:
        from trustdb.db import DEFAULT_DB

        return "" if self._db_path == DEFAULT_DB else f" --db {self._db_path}"

    def _open_trust(self) -> OpenTrust:
        from trustdb.db import TrustDB

        opener: OpenTrust = functools.partial(TrustDB.open, self._db_path)
        return self._trust_hook(opener) if self._trust_hook else opener

    def _prepare(self, backend: Backend) -> OpenTrust:
        """Fill the map before the attach: from the verification cache alone when it covers
        the database (the walk then follows the attach), else by the walk itself."""
        from trustdb.mirror import Mirror
        from trustdb.session import prime_or_sync

        self._mirror = Mirror(self._db, backend.trusted_inodes)
        self._walk_after_attach = prime_or_sync(self._mirror, self._db.entry_count())
        return self._open_trust()

    def _start_reconcile(self) -> None:
        """Walk the database on a thread (`Mirror.sync`: only the difference is written). No
        fork may follow while it runs (the handler's restart and a grow wait for it), and every
        refresh waits for it, so what a refresh applies is applied to walked state."""
        walk = self._reconcile = _MirrorThread("mirror-walk", self._mirror.sync)
        mirror = self._mirror
        # On close (LIFO, before the engine's fds): stop this walk and wait for it.
        self._engine_closers.append(walk.join)
        self._engine_closers.append(lambda: mirror.cancel() if self._reconcile is walk else None)

    def _end_reconcile(self) -> None:
        """Wait for the walk and say what it raised: the next refresh then walks again
        (`Mirror.refresh` syncs until one walk completed)."""
        walk, self._reconcile = self._reconcile, None
        if walk is None:
            return
        walk.join()
        if walk.error is not None:
            print(f"trustdb: the database walk after the start failed: {walk.error}",
                  file=sys.stderr, flush=True)
        else:
            self._save()

    def _start_handler(self, sink: MapKeySink) -> None:
        handler = FirstSeenHandler(HandlerConfig(
            open_trust=self._open_trust(), keys=sink, is_confined=None,
            enforce=self._config.mode == Mode.ENFORCE, interpreters=NO_INTERPRETERS,
            enforce_for=self._task_modes(),
            db_option=self._db_option))
        try:
            handler.start()
        except HandlerError as e:  # the pinned programs still deny; first-seen copies too
            print(f"trustdb: first-seen handler: {e}", file=sys.stderr, flush=True)
            return
        self._handler = handler
        self._engine_closers.append(handler.stop)

    def _forget_vouching(self) -> None:
        """Zero the pinned `first_seen_group`: the group it names is no handler of ours (the
        last daemon's, or one that died), and its freed memory may hold another group soon
        (bpf/vouch.bpf.h, td_vouched_by_handler). This daemon's new handler does not vouch:
        a trusted file chmod'ed by root is then asked about again."""
        assert self._record is not None
        try:
            m = self._pins.open_maps(self._record, ("first_seen_group",))["first_seen_group"]
        except PinError as e:
            print(f"trustdb: {e}", file=sys.stderr, flush=True)
            return
        try:
            m.update(bytes(4), bytes(CFirstSeenGroup(0, 0, 0)))
        except OSError as e:
            print(f"trustdb: cannot forget the first-seen group: {e}", file=sys.stderr, flush=True)
        finally:
            os.close(m.fd)

    def _restart_dead_handler(self) -> bool:
        """A handler that died (crash, OOM kill) is replaced; meanwhile the pinned programs
        denied first-seen copies (fail closed). True when a new one was started."""
        handler = self._handler
        if handler is None or not handler.gone:
            return False
        self._end_reconcile()  # no thread of ours across the fork
        self._forget_vouching()
        handler.stop()
        self._handler = None
        print("trustdb: the first-seen handler died; starting a new one", file=sys.stderr,
              flush=True)
        self._start_handler(self._mirror.sink)  # type: ignore[arg-type]
        return True
    # --- per-uid and per-cgroup modes

    def _task_modes(self) -> Callable[[int], bool] | None:
        maps = self._mode_maps
        if maps is None:
            return None
        return TaskModes(maps.uids, maps.cgroups, self._config.mode).enforce_for

    def apply_modes(self, rules: ServiceRules | None = None) -> bool:
        """Resolve the rules (the policy's, or `rules` after a reload) against the cgroups that
        exist now and write them into the kernel. True when a map changed."""
        if rules is not None:
            self._modes = rules
        if self._mode_maps is None:
            return False
        return self._mode_maps.apply(resolve(self._modes, self._config.mode))

    @property
    def modes(self) -> ResolvedModes | None:
        """The modes in force (None before the engine runs)."""
        return self._mode_maps.current if self._mode_maps else None

    def _save(self) -> None:
        if self._record is None:
            return
        gen = self._mirror.generation
        if gen is not None and gen != self._record.generation:
            self._record = dataclasses.replace(self._record, generation=gen)
        try:
            self._pins.write(self._record)
        except OSError as e:
            print(f"trustdb: cannot record the pins: {e}", file=sys.stderr, flush=True)

    # --- the session.Engine protocol

    @property
    def backend_name(self) -> str:
        assert self._record is not None
        return self._record.backend

    @property
    def mode(self) -> Mode:
        return self._config.mode

    @property
    def db(self) -> TrustDB:
        """The daemon's one handle on the database (LMDB allows one per process)."""
        return self._db

    @property
    def key_sink(self) -> KeySink:
        """The kernel's trusted-inode map."""
        return self._mirror.sink

    def confine(self, pidfd: int) -> None:
        raise BackendError("the service enforces on every task; there is nothing to confine")

    def fileno(self) -> int:
        assert self._ring is not None
        return self._ring.epoll_fd

    def pump(self) -> None:
        from trustdb.session import _first_seen_decision

        assert self._ring is not None
        self._ring.consume()
        if self._reconcile is not None and not self._reconcile.is_alive():
            self._end_reconcile()  # its generation goes into the pin record
            try:
                self.refresh(full=self._pending_full)  # what changed while it walked
            except (DatabaseError, BackendError, OSError) as e:
                print(f"trustdb: cannot follow the trust database: {e}", file=sys.stderr,
                      flush=True)  # the map keeps its state; the next refresh tries again
        handler = self._handler
        assert self._sink is not None
        for denial in handler.denials() if handler is not None else ():
            if not denial.denied and self._config.mode == Mode.ENFORCE:
                # Let through by a per-uid or per-cgroup audit rule: the kernel's own event
                # for the same exec follows, naming the rule.
                continue
            decision = _first_seen_decision(denial, self._config.mode, self.backend_name)
            for consume in self._sink.consumers:
                try:
                    consume(decision)
                except Exception:  # noqa: BLE001 - as EventSink: keep delivering
                    self._sink.failures += 1
        self.handler_restarted = self._restart_dead_handler() or self.handler_restarted

    def handler_fileno(self) -> int | None:
        """Readable when the first-seen handler has denials to report."""
        return self._handler.fileno() if self._handler is not None else None

    def refresh(self, *, full: bool = False) -> bool:
        """Follow the database (the live wake-up calls this); a full re-sync on SIGHUP.
        True when the kernel map was changed. While the walk after the start runs, nothing
        waits for it: the loop must go on answering the installers' questions and pinging the
        watchdog (a 1M-entry walk under load takes tens of seconds); `pump` refreshes once the
        walk has ended."""
        if self._reconcile is not None and self._reconcile.is_alive():
            self._pending_full = self._pending_full or full
            return False
        full, self._pending_full = full or self._pending_full, False
        self._end_reconcile()
        stats = self._mirror.sync() if full else self._mirror.refresh()
        self._save()
        return stats is not None

    def grow_if_needed(self) -> bool:
        """Re-load the engine with a larger map when the database outgrew the pinned one (see
        the module's "Growing"). True when it did (the fds to poll changed)."""
        from trustdb.mirror import map_size_for

        need = map_size_for(self._db.entry_count())
        if self._record is None or need <= (self._config.max_entries or 0):
            return False
        if self._reconcile is not None and self._reconcile.is_alive():
            return False  # asked again at the next refresh (every FALLBACK_CHECK_S at least)
        self._end_reconcile()  # the new engine forks its handler
        old, old_size = self._engine_closers, self._config.max_entries
        self._engine_closers = Closers()
        self._config = dataclasses.replace(self._config, max_entries=need)
        try:
            events_fd = self._fresh(self._record.backend)  # attached and pinned, old pins gone
            self._open_ring(events_fd)
        except BaseException:
            # The old engine still decides (its pins were not removed): keep it.
            self._engine_closers.close()
            self._engine_closers = old
            self._config = dataclasses.replace(self._config, max_entries=old_size)
            raise
        old.close()
        print(f"trustdb: grew the trusted-inode map from {old_size} to {need} entries",
              file=sys.stderr, flush=True)
        return True

    def close(self) -> None:
        self._engine_closers.close()
        self._closers.close()
