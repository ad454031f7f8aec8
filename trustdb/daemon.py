"""`trustdb daemon`: system-wide enforcement, the process the service unit runs.

Life of the process (packaging/trustdb.service):
1. refuse to enforce what would lock the machine up (trustdb.service.preflight): a missing or
   empty database, or one that does not trust the service itself, its hooks, or what boot and
   login run. Nothing is loaded or attached when it refuses.
2. adopt the pinned engine or load, fill and pin a fresh one (trustdb.service.engine); then
   READY=1 for systemd.
3. loop: decisions from the ring buffer, the database watch (a commit reaches the kernel map
   within a turn), the watchdog ping; SIGHUP re-reads the database (full re-sync) and stays up.
4. SIGTERM/SIGINT: close this process's fds and exit. The pins stay, so the kernel goes on
   deciding; only `trustdb service stop` unpins.
"""

from __future__ import annotations

# Every C extension the daemon will ever need is mapped now, before the preflight reads
# /proc/self/maps: one loaded after enforcing starts, untrusted, would be denied (and kill the
# daemon). hashlib (the object hash) and json (the pin record) are the ones imported lazily.
import faulthandler
import hashlib  # noqa: F401
import json  # noqa: F401
import os
import select
import signal
import sys
import time
from pathlib import Path
from types import FrameType
from typing import TextIO

from trustdb.abi import Mode
from trustdb.backends.interface import BackendError, EngineConfig, Scope
from trustdb.dbrecords import DatabaseError
from trustdb.policy.model import Enforcement, ServiceRules
from trustdb.service import preflight
from trustdb.service.engine import ServiceEngine
from trustdb.service.installers import InstallerTrust
from trustdb.service.notify import Notifier
from trustdb.service.pins import PinStore
from trustdb.service.watch import DatabaseWatch
from trustdb.session import DenialReporter, SupervisorError
from trustdb.state import EngineState, publish_state, withdraw_state

_SIGNAL_FLAGS: dict[int, str] = {signal.SIGHUP: "reload", signal.SIGUSR1: "installers"}
"""SIGHUP: re-read the database; SIGUSR1: an installer window opened or closed."""

FALLBACK_CHECK_S = 5.0
"""A generation check (one read transaction, no scan) in case an inotify event was missed."""


def daemon(*, db: Path, mode: Mode | None, backend: str | None, stderr: TextIO | None = None,
           skip_preflight: bool = False, policy: str | None = None) -> int:
    """System-wide enforcement until SIGTERM/SIGINT (the service: only a person starts it).
    `policy` (a name or file, e.g. `workstation`): what the service takes from it is
    `[compilers] trust_outputs` and `[service]`: the default mode (`mode`, unless given) and
    the per-uid and per-cgroup modes, re-read on SIGHUP. Without one, compiler outputs are not
    trusted and every task has `mode` (enforce unless given)."""
    if os.geteuid() != 0:
        raise SupervisorError("trustdb daemon needs root (it loads BPF programs)")
    out = stderr or sys.stderr
    db = db.resolve()
    trust_outputs, rules = _read_policy(policy)
    if mode is None:
        mode = Mode.AUDIT if rules.mode == Enforcement.AUDIT else Mode.ENFORCE
    pinned = PinStore().current()
    # Already enforcing from pins (a restart after a crash): refusing now would not stop the
    # kernel, only the first-seen path; the preflight guards the switch, not the restart.
    if mode == Mode.ENFORCE and not skip_preflight and not (pinned and pinned.mode == "enforce"):
        refusal = preflight.refusal(db)
        if refusal:
            raise SupervisorError(refusal)
    flags: dict[str, bool] = {"stop": False, "reload": False, "installers": False}
    wake_r, wake_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)

    def _on_signal(sig: int, frame: FrameType | None) -> None:
        flags[_SIGNAL_FLAGS.get(sig, "stop")] = True

    for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP, signal.SIGUSR1):
        signal.signal(sig, _on_signal)
    faulthandler.register(signal.SIGUSR2, file=out, all_threads=True)  # where is it stuck?
    signal.set_wakeup_fd(wake_w)
    notifier = Notifier()
    reporter = DenialReporter(db=db, out=out)
    # supervisor_tgid 0: the pinned programs outlive this pid, which may be reused.
    config = EngineConfig(mode=mode, scope=Scope(), supervisor_tgid=0)
    installers = InstallerTrust.from_environment(trust_outputs=trust_outputs)
    if trust_outputs and installers is None:
        print("trustdb: compiler outputs are not trusted (no close-write watch)", file=out,
              flush=True)
    try:
        engine = ServiceEngine(config, db, backend, reporter,
                               trust_hook=installers.wrap_trust if installers else None,
                               modes=rules)
    except BackendError as e:
        raise SupervisorError(str(e)) from e
    watch = DatabaseWatch(db)
    _publish(engine, mode)
    assert engine.report is not None
    how = "adopted the pinned engine" if engine.report.adopted else "loaded and pinned"
    status = (f"enforcing system-wide ({mode.name.lower()}) with the {engine.backend_name} "
              f"backend: {how} in {engine.report.seconds * 1000:.0f} ms")
    print(f"trustdb: {status}", file=out, flush=True)
    _print_modes(engine, out)
    notifier.ready(status)
    try:
        if installers:
            installers.start(engine)
        _loop(engine, watch, notifier, flags, wake_r, out, installers, policy)
    finally:
        notifier.stopping()
        if installers:
            installers.stop()
        watch.close()
        engine.close()  # our fds only: the pins keep the kernel deciding
        withdraw_state(os.getpid())
        signal.set_wakeup_fd(-1)
        os.close(wake_r)
        os.close(wake_w)
    return 0


def _read_policy(policy: str | None) -> tuple[bool, ServiceRules]:
    """(trust compiler outputs, the [service] rules) of the policy."""
    if policy is None:
        return False, ServiceRules()
    from trustdb.policy.load import PolicyError, load

    try:
        loaded = load(policy)
    except PolicyError as e:
        raise SupervisorError(f"policy {policy}: {e}") from e
    return loaded.trust_compiler_outputs, loaded.service


def _publish(engine: ServiceEngine, mode: Mode) -> None:
    modes = tuple(engine.modes.lines()) if engine.modes is not None else ()
    publish_state(EngineState(os.getpid(), "daemon", engine.backend_name, mode.name.lower(),
                              "system-wide", modes=modes))


def _print_modes(engine: ServiceEngine, out: TextIO) -> None:
    modes = engine.modes
    if modes is not None:
        print("trustdb: modes: " + "; ".join(modes.lines()), file=out, flush=True)


def _reload_modes(engine: ServiceEngine, policy: str | None, out: TextIO) -> None:
    """SIGHUP: the policy's per-uid and per-cgroup modes again (a bad policy file keeps the
    rules in force: the kernel maps are not touched)."""
    if policy is None:
        return
    try:
        _, rules = _read_policy(policy)
    except SupervisorError as e:
        print(f"trustdb: {e}; the modes in force stay", file=out, flush=True)
        return
    _apply_modes(engine, out, rules)


def _apply_modes(engine: ServiceEngine, out: TextIO, rules: ServiceRules | None = None) -> None:
    from trustdb.libbpf import LibbpfError

    try:
        if engine.apply_modes(rules):
            _print_modes(engine, out)
            _publish(engine, engine.mode)
    except (LibbpfError, OSError) as e:
        print(f"trustdb: cannot apply the service modes: {e}", file=out, flush=True)


def _loop(engine: ServiceEngine, watch: DatabaseWatch, notifier: Notifier,
          flags: dict[str, bool], wake_r: int, out: TextIO,
          installers: InstallerTrust | None, policy: str | None = None) -> None:
    poller = _poller(engine, watch, wake_r, installers)
    tick = min(FALLBACK_CHECK_S, notifier.watchdog_interval_s or FALLBACK_CHECK_S)
    next_check = time.monotonic() + FALLBACK_CHECK_S
    while not flags["stop"]:
        ready = {fd for fd, _ in poller.poll(int(tick * 1000))}
        if wake_r in ready:
            try:
                os.read(wake_r, 512)
            except BlockingIOError:
                pass
        engine.pump()
        if engine.handler_restarted:
            engine.handler_restarted = False
            poller = _poller(engine, watch, wake_r, installers)
        if installers is not None:
            installers.on_ready(ready)
        now = time.monotonic()
        if installers is not None and (flags["installers"] or now >= next_check):
            flags["installers"] = False
            installers.sync_windows()
        refreshed = flags["reload"]
        if flags["reload"]:
            flags["reload"] = False
            notifier.reloading()
            started = time.monotonic()
            _refresh(engine, out, full=True)
            _reload_modes(engine, policy, out)
            took = f"reloaded the trust database in {(time.monotonic() - started) * 1000:.0f} ms"
            print(f"trustdb: {took}", file=out, flush=True)
            notifier.ready(took)
        elif (watch.fileno() in ready and watch.changed()) or now >= next_check:
            next_check = now + FALLBACK_CHECK_S
            _refresh(engine, out, full=False)
            _apply_modes(engine, out)  # a listed cgroup that appeared since gets its rule
            refreshed = True
        if refreshed and _grow(engine, out):
            poller = _poller(engine, watch, wake_r, installers)
        notifier.watchdog()


def _poller(engine: ServiceEngine, watch: DatabaseWatch, wake_r: int,
            installers: InstallerTrust | None) -> select.poll:
    poller = select.poll()
    poller.register(engine.fileno(), select.POLLIN)
    poller.register(watch.fileno(), select.POLLIN)
    poller.register(wake_r, select.POLLIN)
    handler_fd = engine.handler_fileno()
    if handler_fd is not None:
        poller.register(handler_fd, select.POLLIN)
    if installers is not None:
        for fd in installers.filenos():
            poller.register(fd, select.POLLIN)
    return poller


def _grow(engine: ServiceEngine, out: TextIO) -> bool:
    try:
        return engine.grow_if_needed()
    except (DatabaseError, BackendError, SupervisorError, OSError) as e:
        # The old engine still decides (fail closed: what does not fit stays untrusted).
        print(f"trustdb: cannot grow the trusted-inode map: {e}", file=out, flush=True)
        return False


def _refresh(engine: ServiceEngine, out: TextIO, *, full: bool) -> None:
    try:
        engine.refresh(full=full)
    except (DatabaseError, BackendError, OSError) as e:
        # The map keeps its last state (fail closed); say so and try again on the next wake.
        print(f"trustdb: cannot follow the trust database: {e}", file=out, flush=True)
