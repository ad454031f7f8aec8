"""Trusted installers ("managed installer"): what a trusted package manager writes during a
transaction is trusted when it closes the file, and verified against its package database when
the transaction ends.

The window: dpkg's `pre-invoke` hook (packaging/hooks/dpkg/trustdb) runs `trustdb service
installer-begin`, which drops a token in /run/trustdb/installers/ and signals the daemon
(SIGUSR1); the daemon marks every executable filesystem with FAN_CLOSE_WRITE in a *notification*
group (it never answers anything: nothing can be denied or held up by it) and acknowledges.
`installer-end` (dpkg's `post-invoke`) imports the package database, then closes the window: the
daemon removes the marks and drops the `installer:*` source, so what the package database did
not vouch for loses its trust at once, and each such file is reported.

For each close-after-write in the window: the writer's /proc/PID/exe must be one of INSTALLERS
*and* its inode key must be in the trusted map (a renamed copy of dpkg is not dpkg); the event's
fd, opened by the kernel on the very inode that was closed, is hashed, and the digest is added
under `installer:<name>`. A file written by any other program is ignored (stays untrusted).
Race-free for the postinst case: the close-write event is queued when dpkg closes the file,
before it can exec it. The first-seen handler (a forked process that answers the exec's
permission event before the kernel's check) asks the daemon over a socket when a digest is not
trusted while a window is open (`wrap_trust`); the daemon drains the queue, records what
installers wrote, and answers.

The content hashed is the content the trusted writer closed (trustdb.service.closewrite): the
daemon takes a read lease on the event's fd, which the kernel grants only while no one has the
file open for writing (a writable shared mapping counts) and which makes any later open for
writing wait, then drains the queue again: a close-write by any other program since the trusted
one's supersedes it (the file stays untrusted). What is left (README): truncate(2) by path, which
needs no open file, can shorten the file before the lease; and the end-of-transaction import
revokes whatever dpkg's md5sums do not vouch for.

An rpm run by hand (no hook) gets a window of its own from its exec event
(trustdb.service.handheld). Split out: the tokens and the hooks' side
(trustdb.service.installer_windows), the first-seen handler's question channel
(trustdb.service.installer_ask).

The same group, when the daemon's policy says `[compilers] trust_outputs = true`, keeps the
close-write marks on for good and trusts what trusted compilers and linkers write
(trustdb.service.compilers), under `built:<program>` with provenance `built-by:<program>`.
"""

from __future__ import annotations

import contextlib
import os
import socket
import sys
import threading
from collections import deque
from collections.abc import Callable
from typing import TYPE_CHECKING

from trustdb.fanotify import Event, Fanotify, FanotifyError
from trustdb.first_seen_handler import host_filesystems
from trustdb.model import InodeKey, TrustEntry
from trustdb.service.closewrite import (
    FAN_CLOSE_WRITE,
    TRACE,
    ClosedFiles,
    Writer,
    ignore_lease_breaks,
)
from trustdb.service.compilers import FAN_OPEN_EXEC, CompilerWatch
from trustdb.service.handheld import (
    ImplicitWindow,
    RpmdbCheck,
    implicit_window,
    runs_as_root,
)
from trustdb.service.installer_ask import ASK_TIMEOUT_S, SEQ, AskingOpener
from trustdb.service.installer_windows import (
    INSTALLERS,
    WINDOW_DIR,
    Window,
    begin,
    end,
    make_directory,
    open_windows,
    trusted_directory,
)

if TYPE_CHECKING:
    from trustdb.first_seen import OpenTrust
    from trustdb.service.engine import ServiceEngine

FAN_CLASS_NOTIF = 0x00
FAN_CLOEXEC = 0x01
FAN_NONBLOCK = 0x02
SOURCE_KIND = "installer"
BUILT_KIND = "built"
ENABLE_ENV = "TRUSTDB_TRUSTED_INSTALLERS"
__all__ = ["ASK_TIMEOUT_S", "INSTALLERS", "WINDOW_DIR", "InstallerTrust", "Window", "begin",
           "end", "open_windows"]


class InstallerTrust:
    """The daemon's side: the notification group, the window, the installer source."""

    def __init__(self, *, trust_outputs: bool = False,
                 filesystems: Callable[[], list[str]] = host_filesystems,
                 own_pid: int | None = None) -> None:
        """`trust_outputs`: the policy's `[compilers] trust_outputs` (the close-write marks then
        stay on, and what trusted compilers write is trusted too). `own_pid`: rpm processes it
        started are never trusted writers (default: this process; tests name another)."""
        self._own_pid = os.getpid() if own_pid is None else own_pid
        self._fan = Fanotify(FAN_CLASS_NOTIF | FAN_CLOEXEC | FAN_NONBLOCK)
        self._filesystems = filesystems
        self.compilers = CompilerWatch(self._fan.mark_inode_fd, self._key_trusted) \
            if trust_outputs else None
        # The installers' own exec events too: a dpkg or rpm that exited before the daemon read
        # its last close-write is still known by them.
        self._installer_execs = CompilerWatch(
            self._fan.mark_inode_fd, self._key_trusted,
            paths=lambda: sorted({os.path.realpath(p) for p in INSTALLERS if os.path.isfile(p)}),
            name_of=lambda real: INSTALLERS.get(real) or next(
                (n for p, n in INSTALLERS.items() if os.path.realpath(p) == real), None))
        self._closed = ClosedFiles(self._drain, self._writer, self._on_exec)
        # The first-seen handler (forked later, so it inherits `_ask_handler`) asks on it.
        self._ask_daemon, self._ask_handler = socket.socketpair(
            socket.AF_UNIX, socket.SOCK_SEQPACKET)
        self._marked: list[str] = []
        self._window_open = False
        self._windows: list[Window] = []
        self._implicit: dict[int, ImplicitWindow] = {}
        """rpm processes run by hand (trustdb.service.handheld), by pid."""
        self._checks: deque[RpmdbCheck] = deque()
        """Exited rpms' imports, one step per main-loop turn; `_busy_r` is readable while
        any is left, so the loop's poll does not wait."""
        self._busy_r, self._busy_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        self._lock = threading.Lock()
        self._engine: ServiceEngine | None = None
        self.trusted: dict[str, bytes] = {}
        """Path -> digest added in the current window."""
        self.reports: list[str] = []

    @classmethod
    def from_environment(cls, *, trust_outputs: bool = False) -> InstallerTrust | None:
        if os.environ.get(ENABLE_ENV, "1") == "0":
            return None
        try:
            return cls(trust_outputs=trust_outputs)
        except FanotifyError as e:
            print(f"trustdb: trusted installers off: {e}", file=sys.stderr, flush=True)
            return None

    def start(self, engine: ServiceEngine) -> None:
        self._engine = engine
        ignore_lease_breaks()
        make_directory()
        if not trusted_directory():
            print(f"trustdb: {WINDOW_DIR} is not root's alone: installer windows are ignored",
                  file=sys.stderr, flush=True)
        self._drop_stale_rpm_windows()
        self.sync_windows()

    def stop(self) -> None:
        self.settle()  # fail closed: what an exited rpm wrote is verified before we go
        self._unmark()
        self._fan.close()
        self._ask_daemon.close()
        self._ask_handler.close()
        os.close(self._busy_r)
        os.close(self._busy_w)

    def filenos(self) -> tuple[int, int, int]:
        """The close-write queue, the handler's questions, and the pending imports: poll all."""
        return self._fan.fd, self._ask_daemon.fileno(), self._busy_r

    def on_ready(self, fds: set[int]) -> None:
        if self._fan.fd in fds:
            self.pump()
        if self._ask_daemon.fileno() in fds:
            self.answer()
        if self._checks:
            self.step_checks()

    def step_checks(self) -> None:
        """One step of the oldest pending import of an exited rpm (trustdb.service.handheld)."""
        from trustdb.dbrecords import DatabaseError

        with self._lock:
            if not self._checks or self._engine is None:
                return
            check = self._checks[0]
            window = check.window
            try:
                if not check.step(self._engine.db):
                    return
                self._checks.popleft()
                revoked = check.finish(self._engine.db)
            except DatabaseError as e:
                self._checks.popleft()
                with contextlib.suppress(DatabaseError):  # else dropped at the next start
                    self._engine.db.remove_source(window.source)
                print(f"trustdb: cannot verify what rpm {window.pid} wrote: {e}",
                      file=sys.stderr, flush=True)
                return
            finally:
                if not self._checks:
                    with contextlib.suppress(BlockingIOError):
                        os.read(self._busy_r, 64)
            self._report_revoked(revoked, f"rpm (pid {window.pid})", "the rpm database")
            self._engine.refresh()

    def settle(self) -> None:
        """Finish every pending import now (the daemon's stop; tests)."""
        while self._checks and self._engine is not None:
            self.step_checks()

    def _drop_stale_rpm_windows(self) -> None:
        """A daemon killed while an rpm run by hand was writing, or before its import ended,
        left that window's provisional source behind: nothing will verify it now (fail closed:
        drop it; `trustdb import rpm` trusts again what the rpmdb vouches for)."""
        from trustdb.dbrecords import DatabaseError

        assert self._engine is not None
        try:
            stale = [s.label for s in self._engine.db.sources()
                     if s.kind == SOURCE_KIND and "@" in s.label]
            for label in stale:
                self._engine.db.remove_source(label)
        except DatabaseError as e:
            print(f"trustdb: cannot drop stale rpm windows: {e}", file=sys.stderr, flush=True)
            return
        for label in stale:
            print(f"trustdb: dropped {label}: an rpm's files trusted at close, never verified "
                  "(run `trustdb import rpm` for what its rpmdb vouches for)", file=sys.stderr,
                  flush=True)
        if stale:
            self._engine.refresh()

    def answer(self) -> None:
        """One question from the first-seen handler: is this digest trusted, counting what
        installers closed up to now?"""
        try:
            question = self._ask_daemon.recv(64, socket.MSG_DONTWAIT)
        except BlockingIOError:
            return
        seq, digest = question[:SEQ], question[SEQ:]
        self.pump()
        trusted = self._engine is not None and self._engine.db.is_trusted(digest)
        if TRACE:
            print(f"trustdb: close-write: asked about {digest.hex()[:16]}: {trusted} "
                  f"(window {'open' if self._window_open else 'closed'})", file=sys.stderr,
                  flush=True)
        with contextlib.suppress(OSError):
            self._ask_daemon.send(seq + (b"1" if trusted else b"0"))

    # --- the window

    def sync_windows(self) -> None:
        """Open or close the window to match the tokens (SIGUSR1, and every fallback check)."""
        windows = self._windows = open_windows()
        if any(not w.alive() for w in self._implicit.values()):
            self.pump()  # an rpm run by hand exited: verify what it wrote
        for watch in self._exec_watches():
            watch.refresh()  # a compiler or installer upgraded since: its new inode
        if windows or self.compilers is not None:
            self._mark()
        if windows:
            self._window_open = True
        elif self._window_open:
            self.pump()  # what the installer closed before its window ended still counts
            self._window_open = False
            self._unmark_if_idle()
            self._close_window()
        for w in windows:
            with contextlib.suppress(OSError):
                (WINDOW_DIR / f"{w.token}.ack").write_text(str(os.getpid()))

    def _mark(self) -> None:
        if self._marked:
            return
        for fs in self._filesystems():
            try:
                self._fan.mark_filesystem(fs, FAN_CLOSE_WRITE)
                self._marked.append(fs)
            except FanotifyError:
                continue  # a filesystem without an fsid: nothing dpkg writes lives there

    def _unmark_if_idle(self) -> None:
        if self.compilers is None and not self._window_open and not self._implicit:
            self._unmark()

    def _unmark(self) -> None:
        if self._marked and self._fan.fd >= 0:
            with contextlib.suppress(FanotifyError):
                self._fan.flush_filesystem_marks()
        self._marked = []

    def _close_window(self) -> None:
        """Drop the installer sources: only what the package database vouches for stays."""
        from trustdb.dbrecords import DatabaseError

        if not self.trusted or self._engine is None:
            return
        db = self._engine.db  # one LMDB environment per process: the engine's
        try:
            for src in db.sources():
                if src.kind == SOURCE_KIND and "@" not in src.label:  # not an rpm's by hand
                    db.remove_source(src.label)
            revoked = [p for p, d in self.trusted.items() if not db.is_trusted(d)]
        except DatabaseError as e:
            print(f"trustdb: cannot close the installer window: {e}", file=sys.stderr, flush=True)
            return
        self._report_revoked(revoked, "a package manager", "the package database")
        self.trusted.clear()
        if self._engine is not None:
            self._engine.refresh()

    # --- events

    def pump(self) -> int:
        """Trust what installers (and compilers) closed since the last call; returns how many
        files."""
        with self._lock:
            exited = [(w, w.exited()) for w in self._exec_watches()]
            rpms_done = [w for w in self._implicit.values() if not w.alive()]
            found = self._closed.collect()
            for watch, pids in exited:
                watch.forget(pids)  # their events were all queued before we drained
            if found:
                self._record(found)
            for window in rpms_done:
                self._end_implicit(window)
            return len(found)

    def _open_implicit(self, pid: int) -> None:
        """rpm `pid` just exec'd (its binary trusted): a window of its own, if it is root's."""
        if pid in self._implicit:
            return
        window = implicit_window(pid, self._own_pid)
        if window is None:
            return
        self._implicit[pid] = window
        window.open()
        self._mark()

    def _end_implicit(self, window: ImplicitWindow) -> None:
        """rpm exited: verify what it wrote against its rpmdb, in steps of the main loop
        (`step_checks`); nothing to do if it wrote nothing: `rpm -q` costs no import."""
        self._implicit.pop(window.pid, None)
        window.close()
        self._unmark_if_idle()
        if not window.trusted or self._engine is None:
            return
        if not self._checks:
            os.write(self._busy_w, b"x")
        self._checks.append(RpmdbCheck(window))

    def _report_revoked(self, paths: list[str], writer: str, database: str) -> None:
        for p in paths:
            line = (f"trustdb: revoked {p}: written by {writer}, but its content is not what "
                    f"{database} records")
            self.reports.append(line)
            print(line, file=sys.stderr, flush=True)

    def _drain(self) -> list[Event]:
        try:
            return list(self._fan.read(65536))
        except BlockingIOError:
            return []

    def _exec_watches(self) -> list[CompilerWatch]:
        return [self._installer_execs] + ([self.compilers] if self.compilers else [])

    def _on_exec(self, ev: Event) -> None:
        if ev.mask & FAN_OPEN_EXEC:
            # By the event's file, not /proc/PID/exe: the event is queued when execve opens the
            # binary, and may be read before the exec completes (exe is still the old one).
            installer = self._installer_execs.on_exec(ev.fd, ev.pid)
            if self.compilers:
                self.compilers.on_exec(ev.fd, ev.pid)
            if installer is not None and installer.name == "rpm":
                self._open_implicit(ev.pid)  # a trusted rpm, exec'd in the host's namespaces

    def _writer(self, pid: int) -> Writer | None:
        """Whose trust a close by `pid` carries: a trusted installer's while a window is open,
        a trusted compiler's when the policy trusts outputs, else none."""
        implicit = self._implicit.get(pid)
        if implicit is not None and self._installer(pid) == "rpm":
            if implicit.alive():
                if not runs_as_root(pid):
                    return None  # it dropped root since its exec: not a trusted writer
                implicit.read_command_line()
            return Writer(implicit.source, SOURCE_KIND, "installed-by:rpm")
        if self._window_open and any(w.any_exe and w.installer_pid == pid
                                     for w in self._windows):
            return Writer(f"{SOURCE_KIND}:dnf", SOURCE_KIND, "installed-by:dnf")
        if self._window_open:
            name = self._installer(pid)
            if name is not None:
                return Writer(f"{SOURCE_KIND}:{name}", SOURCE_KIND, f"installed-by:{name}")
        if self.compilers is not None:
            compiler = self.compilers.writer(pid)
            if compiler is not None:
                return Writer(f"{BUILT_KIND}:{compiler.name}", BUILT_KIND,
                              f"built-by:{compiler.name}", elf_only=True)
        return None

    def _key_trusted(self, key: InodeKey) -> bool:
        if self._engine is None:
            return False
        contains = getattr(self._engine.key_sink, "__contains__", None)
        return contains is not None and bool(contains(key))

    def _installer(self, pid: int) -> str | None:
        """The installer's name if `pid` runs a trusted installer binary, else None."""
        try:
            exe = os.readlink(f"/proc/{pid}/exe")
            st = os.stat(f"/proc/{pid}/exe")
        except OSError:
            # Gone already: its exec event says what it ran (or nothing: not trusted).
            known = self._installer_execs.writer(pid)
            return known.name if known is not None else None
        name = INSTALLERS.get(exe)
        if name is None or not self._key_trusted(InodeKey.from_stat(st)):
            return None  # a dpkg whose content the kernel does not trust is not an installer
        return name

    def _record(self, found: list[tuple[Writer, TrustEntry]]) -> None:
        from trustdb.dbrecords import DatabaseError

        assert self._engine is not None
        by_source: dict[Writer, list[TrustEntry]] = {}
        for writer, entry in found:
            by_source.setdefault(writer, []).append(entry)
        try:
            for writer, entries in by_source.items():
                self._engine.db.add_entries(writer.source, writer.kind, entries)
        except DatabaseError as e:
            print(f"trustdb: cannot record written files: {e}", file=sys.stderr, flush=True)
            return
        for writer, entry in found:
            implicit = next((w for w in self._implicit.values() if w.source == writer.source),
                            None)
            if implicit is not None:
                implicit.trusted[entry.path] = entry.digest
            elif writer.kind == SOURCE_KIND:
                self.trusted[entry.path] = entry.digest
            else:
                print(f"trustdb: trusted {entry.path} ({writer.origin})", file=sys.stderr,
                      flush=True)

    # --- the first-seen path

    def wrap_trust(self, opener: OpenTrust) -> OpenTrust:
        """How the first-seen handler opens the database: as `opener` does, but a digest the
        database does not trust while a window is open is asked of the daemon."""
        return AskingOpener(opener, self._ask_handler, always_ask=self.compilers is not None)
