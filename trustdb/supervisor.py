"""The supervising process of `trustdb run` (the engine session it holds: trustdb.session).

`run` owns, for the life of one command: a cgroup (trustdb.confine), the engine (BPF programs
scoped to that cgroup, the mirror filling their map, the ring buffer of decisions), and the
confined child. The order matters and is the whole design:

1. create the cgroup, and fork the reaper that removes it whatever way we end;
2. fork the child (init of a new PID namespace, in the cgroup, its mount namespace built), which
   waits at a gate; it is forked before any BPF object exists, so it inherits no BPF fd;
3. load the engine (on a thread, started right after that fork, while the child builds its
   namespace and we build the rest of the run: trustdb.backends.BackgroundLoad), fill the
   map, attach; mark the child confined through its pidfd;
4. open the gate: the child installs seccomp and exec's CMD, the first thing judged;
5. until CMD ends: report each denial on stderr, log every decision, follow DB changes;
6. on every exit path: kill and remove the cgroup, detach (closing our fds is enough: nothing
   is pinned, so even SIGKILL of this process removes every program).

Never fail open: the child has PR_SET_PDEATHSIG(SIGKILL) and is its namespace's init, so if this
process dies, the confined tree dies with it.
"""

from __future__ import annotations

import functools
import os
import re
import select
import shlex
import signal
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from types import FrameType
from typing import TYPE_CHECKING, TextIO

from trustdb import confine
from trustdb.abi import Mode
from trustdb.backends import BackgroundLoad
from trustdb.backends.interface import BackendError, EngineConfig, Scope
from trustdb.confine import hardening
from trustdb.confine.filesystem import FilesystemSetup, dns_relay_wanted, plan_for
from trustdb.confine.git_guard import GitGuard
from trustdb.confine.new_repos import NewRepoGuard
from trustdb.confine.pty import TerminalRelay
from trustdb.db import DEFAULT_DB
from trustdb.dns_relay import DnsRelay, host_nameservers
from trustdb.policy import load as policies
from trustdb.policy.model import Policy, ScriptJudgement
from trustdb.policy.paths import resolve
from trustdb.session import (
    REFRESH_INTERVAL_S,
    CachedDigest,
    DenialReporter,
    Engine,
    EngineFactory,
    EngineSession,
    SupervisorError,
    default_engine,
)
from trustdb.state import EngineState, publish_state, withdraw_state
from trustdb.system_trees import writable_grant_error

if TYPE_CHECKING:
    from trustdb.first_seen import Interpreters

KILL_GRACE_S = 2.0
"""After forwarding SIGINT/SIGTERM, how long CMD gets before the tree is killed. CMD is the init
of its PID namespace, and an init ignores every signal it has no handler for."""

@dataclass(frozen=True, slots=True)
class RunOptions:
    argv: Sequence[str]
    db: Path = DEFAULT_DB
    mode: Mode = Mode.ENFORCE
    backend: str | None = None
    policy: Policy | None = None
    """What the tree may reach (default: the `agent` policy), with the run's one-off additions."""
    workdir: str | None = None
    """$WORKDIR of the policy and the command's cwd (default: ours)."""


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


def _default_engine(policy: Policy, db: Path, loading: BackgroundLoad | None) -> EngineFactory:
    """The engine of a run: the session (trustdb.session) with the policy's programs and
    interpreters, on the backend `loading` is loading."""
    # Imported here, after the child's fork, while the engine loads (not before the fork).
    from trustdb.confine.programs import (
        interpreter_names,
        interpreter_refs,
        program_refs,
        recorded_interpreters,
    )

    judged = policy.interpreters.scripts == ScriptJudgement.TRUSTED
    records = _recorded_paths(db, interpreter_names(policy)) if judged else []
    recorded = recorded_interpreters(policy, records)  # flagged in the kernel too (lsm)
    return functools.partial(
        default_engine, programs=program_refs(policy) + interpreter_refs(recorded),
        interpreters=functools.partial(_interpreters, policy, recorded) if judged else None,
        loading=loading)


def _map_size(db: Path) -> int:
    """The kernel map's size for the database (trustdb.mirror.map_size_for), known before the
    engine loads: the load needs it."""
    from trustdb.db import TrustDB
    from trustdb.dbrecords import DatabaseError
    from trustdb.mirror import map_size_for

    try:
        with TrustDB.open(db) as t:
            return map_size_for(t.entry_count())
    except DatabaseError as e:
        raise SupervisorError(f"trust database {db}: {e}") from e


def _recorded_paths(db: Path, named: re.Pattern[str] | None) -> list[tuple[str, bytes]]:
    """(path, digest) of every trusted fact whose basename matches `named` (interpreters are
    recognised by recorded name)."""
    from trustdb.db import TrustDB
    from trustdb.dbrecords import DatabaseError

    if named is None:
        return []
    try:
        with TrustDB.open(db) as t:
            return t.paths_named(named)
    except DatabaseError as e:
        raise SupervisorError(f"trust database {db}: {e}") from e


def run(options: RunOptions, *, engine_factory: EngineFactory | None = None,
        stderr: TextIO | None = None) -> int:
    """Run one command confined; returns its exit status."""
    if os.geteuid() != 0:
        raise SupervisorError("trustdb run needs root (it loads BPF programs)")
    db = options.db.resolve()
    if not db.is_dir():
        raise SupervisorError(f"no trust database at {db} (create one with `trustdb trust`)")
    reporter = DenialReporter(db=db, out=stderr or sys.stderr)
    # A thread coming back from a blocking call waits up to the switch interval for a thread
    # running Python (the mirror's fills) to hand over the GIL: 5 ms by default, paid by the
    # main thread at each step of the start (forks, pipes, the gate) while a fill runs.
    switch_interval = sys.getswitchinterval()
    sys.setswitchinterval(min(switch_interval, 0.001))
    try:
        return _prepare_and_run(options, engine_factory, reporter, db)
    finally:
        sys.setswitchinterval(switch_interval)


def _prepare_and_run(options: RunOptions, engine_factory: EngineFactory | None,
                        reporter: DenialReporter, db: Path) -> int:
    _make_state_dir()
    _sweep_stale_cgroups()
    signals = _Signals()
    signals.install()
    policy = options.policy or policies.load(policies.DEFAULT_POLICY)
    workdir = os.path.realpath(options.workdir or os.getcwd())
    refusal = writable_grant_error([workdir, *resolve(policy.filesystem, workdir).read_write])
    if refusal:
        raise SupervisorError(refusal)
    dns = DnsRelay(host_nameservers()) if dns_relay_wanted(policy) else None
    resolv_conf = ""
    if dns is not None:
        try:
            dns.listen()
            resolv_conf = str(dns.write_resolv_conf())
        except OSError as e:  # the tree then has no DNS (UDP is refused): say so, go on
            print(f"trustdb: DNS relay not available ({e.strerror}): no name lookups inside",
                  file=reporter.out)
            dns.close()
            dns = None
    try:
        return _run(options, engine_factory, reporter, signals, policy, db, workdir,
                    plan_for(policy, db, workdir, _log_dirs(), resolv_conf=resolv_conf), dns)
    finally:
        if dns is not None:
            dns.close()
        from trustdb import corecache

        corecache.write_pending()  # a first run on this boot: for the next runs' loads


def _run(options: RunOptions, engine_factory: EngineFactory | None, reporter: DenialReporter,
         signals: _Signals, policy: Policy, db: Path, workdir: str, fs: FilesystemSetup,
         dns: DnsRelay | None) -> int:
    default = engine_factory is None
    loading: BackgroundLoad | None = None
    mdwe = hardening.mdwe_supported()
    cgroup = confine.RunCgroup.create()
    child: confine.ConfinedChild | None = None
    engine: Engine | None = None
    relay: TerminalRelay | None = None
    git_guard: GitGuard | None = None
    new_repos: NewRepoGuard | None = None
    released = False
    try:
        confine.start_watcher(cgroup)
        new_repos = NewRepoGuard(fs.resolved.read_write, lambda line: print(
            line, file=reporter.out, flush=True))  # before the tree starts
        relay = TerminalRelay.open_if_terminal()
        setup = confine.ExecSetup(
            deny_write_execute=not policy.jit and mdwe,
            filesystem=fs.build,
            cwd=workdir,
            terminal=relay.slave if relay else -1,
            terminal_replaces=relay.replaced if relay else (),
            ip_sockets=fs.ip_sockets,
        )
        config = EngineConfig(
            mode=options.mode,
            scope=Scope.for_cgroup(cgroup.path),
            supervisor_tgid=os.getpid(),
            max_entries=_map_size(db) if default else None,
        )

        def load_engine() -> None:  # the reaper and the child are forked: no fork follows
            nonlocal loading
            loading = BackgroundLoad(options.backend, config)

        child = confine.spawn(options.argv, cgroup, fs.plan, setup=setup,
                              forked=load_engine if default else None)
        if relay is not None:
            relay.start()
        if dns is not None:
            dns.serve()
        git_guard = GitGuard(fs.resolved.pinned, lambda line: print(line, file=reporter.out,
                                                                       flush=True))
        git_guard.start()
        reporter.command = confine.resolve_command(options.argv, dict(os.environ))
        reporter.command_pid = child.pid
        if engine_factory is None:
            engine_factory = _default_engine(policy, db, loading)
        engine = engine_factory(config, db, options.backend, reporter)
        publish_state(EngineState(os.getpid(), "run", engine.backend_name,
                                  options.mode.name.lower(), str(cgroup.path),
                                  shlex.join(options.argv), fs.mechanism))
        engine.confine(child.pidfd)
        signals.child = child
        if policy.jit:
            memory = "JITs allowed: " + ", ".join(map(str, policy.jit))
        elif mdwe:
            memory = "W^X (no JIT allowed)"
        else:
            memory = "W^X by the kernel programs only (no PR_SET_MDWE before Linux 6.3)"
        print(f"trustdb: policy {policy.name}; {fs.mechanism}; {memory}", file=reporter.out,
              flush=True)
        if policy.trust_compiler_outputs:
            print(f"trustdb: note: policy {policy.name} sets [compilers] trust_outputs, which "
                  "only the service applies (trustdb daemon): inside run, what a compiler writes "
                  "is judged like any other file (trust it with `trustdb trust`)",
                  file=reporter.out, flush=True)
        try:
            child.release()
        except confine.ConfineError:
            engine.pump()  # CMD refused (EPERM) by the first-seen handler: its line says why
            if reporter.count:
                return 126
            raise
        released = True
        tree_started = getattr(engine, "tree_started", None)  # EngineSession: the walk
        if tree_started is not None:
            tree_started()
        return _supervise(child, engine, signals, relay)
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
                if isinstance(engine, EngineSession):
                    engine.wait_for_handler = False  # the tree is gone; we leave next
                engine.close()
                withdraw_state(os.getpid())
            if loading is not None:
                loading.discard()  # a load no engine took (setup failed before it)
            signals.restore()
            if relay is not None:
                relay.close()
            if git_guard is not None:
                git_guard.close()
            if new_repos is not None:
                new_repos.close()  # the tree is gone (its cgroup was removed)


def _supervise(child: confine.ConfinedChild, engine: Engine, signals: _Signals,
               relay: TerminalRelay | None) -> int:
    wake_r, wake_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
    old_wakeup = signal.set_wakeup_fd(wake_w)  # a signal ends the poll at once
    try:
        return _supervise_loop(child, engine, signals, wake_r, relay)
    finally:
        signal.set_wakeup_fd(old_wakeup)
        os.close(wake_r)
        os.close(wake_w)


def _supervise_loop(child: confine.ConfinedChild, engine: Engine, signals: _Signals,
                    wake: int, relay: TerminalRelay | None) -> int:
    poller = select.poll()
    poller.register(child.pidfd, select.POLLIN)
    poller.register(engine.fileno(), select.POLLIN)
    handler_fd = engine.handler_fileno()
    if handler_fd is not None:
        poller.register(handler_fd, select.POLLIN)  # its denials, or its death, wake us at once
    poller.register(wake, select.POLLIN)
    relayed = set(relay.fds()) if relay else set()
    for fd in relayed:
        poller.register(fd, select.POLLIN)
    while True:
        timeout = REFRESH_INTERVAL_S
        if signals.kill_at is not None:
            timeout = max(0.0, min(timeout, signals.kill_at - time.monotonic()))
            if timeout == 0.0:
                _kill(child)
        events = poller.poll(int(timeout * 1000))
        ready = {fd for fd, _ in events}
        if relay is not None:
            for fd, ev in events:
                if fd in relayed:
                    relay.on_ready(fd)
                    if ev & (select.POLLHUP | select.POLLERR) and fd == 0:
                        poller.unregister(0)  # the user's terminal went away
                        relayed.discard(0)
        if wake in ready:
            while os.read(wake, 512) == 512:
                pass
        engine.pump()
        if child.pidfd in ready:
            break
    status = child.wait()
    if relay is not None:
        relay.drain()
    engine.pump()  # the decisions that explain why CMD died
    if signals.received and status == 128 + signal.SIGKILL:
        return 128 + signals.received
    return status


def _interpreters(policy: Policy, recorded: dict[bytes, str],
                  cached: CachedDigest) -> Interpreters:
    from trustdb.confine.programs import interpreter_digests
    from trustdb.first_seen import Interpreters

    return Interpreters(digests=interpreter_digests(policy, cached, recorded),
                        deny_inline=policy.interpreters.deny_inline,
                        read_sources=policy.interpreters.read_sources)


def _make_state_dir() -> None:
    """Create trustdb's state directory before the tree starts: every run covers it
    (trustdb.confine.mounts), but a cover needs something to cover, and a tree with /run
    writable could otherwise create it and plant files there for later runs."""
    from trustdb.state import STATE_DIR

    try:
        STATE_DIR.mkdir(mode=0o755, parents=True, exist_ok=True)
    except OSError:
        pass  # read-only /run: then the tree, on the same filesystem, cannot create it either


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


def reexec_isolated() -> None:
    """Re-exec this command under `python -I` unless already isolated (trustdb.isolation; the
    CLI's entry point normally did it already, before its own imports)."""
    from trustdb import isolation

    isolation.reexec_isolated(sys.argv)
