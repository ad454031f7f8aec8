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

The same group, when the daemon's policy says `[compilers] trust_outputs = true`, keeps the
close-write marks on for good and trusts what trusted compilers and linkers write
(trustdb.service.compilers), under `built:<program>` with provenance `built-by:<program>`.
"""

from __future__ import annotations

import contextlib
import os
import select
import socket
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
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
from trustdb.state import STATE_DIR

if TYPE_CHECKING:
    from trustdb.first_seen import OpenTrust, TrustLookup
    from trustdb.service.engine import ServiceEngine

FAN_CLASS_NOTIF = 0x00
FAN_CLOEXEC = 0x01
FAN_NONBLOCK = 0x02
_SEQ = 8
"""Bytes of the question number that each answer repeats."""
ASK_TIMEOUT_S = 15.0
"""How long the first-seen handler waits for the daemon's answer (then: not trusted, and the
channel is closed for good). Generous: the daemon may be hashing the installer's files, and under
emulation (the VM tier) that takes seconds; only execs during an installer window (or, with
trusted compiler outputs, any miss) wait."""

INSTALLERS: dict[str, str] = {
    "/usr/bin/dpkg": "dpkg",
    "/bin/dpkg": "dpkg",
    "/usr/bin/rpm": "rpm",
    "/bin/rpm": "rpm",
    "/usr/bin/dnf5": "dnf5",
}
"""Executables whose writes are trusted while a window is open (by real path)."""

WINDOW_DIR = STATE_DIR / "installers"
SOURCE_KIND = "installer"
BUILT_KIND = "built"
ENABLE_ENV = "TRUSTDB_TRUSTED_INSTALLERS"


@dataclass(frozen=True, slots=True)
class Window:
    token: str
    installer_pid: int


def open_windows(directory: Path = WINDOW_DIR) -> list[Window]:
    """Windows whose installer process still lives (a crashed dpkg closes its window)."""
    out = []
    for p in sorted(directory.glob("*.open")) if directory.is_dir() else []:
        try:
            pid = int(p.read_text().strip() or 0)
        except (OSError, ValueError):
            continue
        if pid and Path(f"/proc/{pid}").exists():
            out.append(Window(p.stem, pid))
        else:
            with contextlib.suppress(OSError):
                p.unlink()
    return out


class InstallerTrust:
    """The daemon's side: the notification group, the window, the installer source."""

    def __init__(self, *, trust_outputs: bool = False,
                 filesystems: Callable[[], list[str]] = host_filesystems) -> None:
        """`trust_outputs`: the policy's `[compilers] trust_outputs` (the close-write marks then
        stay on, and what trusted compilers write is trusted too)."""
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
        WINDOW_DIR.mkdir(parents=True, exist_ok=True)
        self.sync_windows()

    def stop(self) -> None:
        self._unmark()
        self._fan.close()
        self._ask_daemon.close()
        self._ask_handler.close()

    def filenos(self) -> tuple[int, int]:
        """The close-write queue and the handler's questions: poll both."""
        return self._fan.fd, self._ask_daemon.fileno()

    def on_ready(self, fds: set[int]) -> None:
        if self._fan.fd in fds:
            self.pump()
        if self._ask_daemon.fileno() in fds:
            self.answer()

    def answer(self) -> None:
        """One question from the first-seen handler: is this digest trusted, counting what
        installers closed up to now?"""
        try:
            question = self._ask_daemon.recv(64, socket.MSG_DONTWAIT)
        except BlockingIOError:
            return
        seq, digest = question[:_SEQ], question[_SEQ:]
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
        windows = open_windows()
        for watch in self._exec_watches():
            watch.refresh()  # a compiler or installer upgraded since: its new inode
        if (windows or self.compilers is not None) and not self._marked:
            for fs in self._filesystems():
                try:
                    self._fan.mark_filesystem(fs, FAN_CLOSE_WRITE)
                    self._marked.append(fs)
                except FanotifyError:
                    continue  # a filesystem without an fsid: nothing dpkg writes lives there
        if windows:
            self._window_open = True
        elif self._window_open:
            self.pump()  # what the installer closed before its window ended still counts
            self._window_open = False
            if self.compilers is None:
                self._unmark()
            self._close_window()
        for w in windows:
            with contextlib.suppress(OSError):
                (WINDOW_DIR / f"{w.token}.ack").write_text(str(os.getpid()))

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
                if src.kind == SOURCE_KIND:
                    db.remove_source(src.label)
            revoked = [p for p, d in self.trusted.items() if not db.is_trusted(d)]
        except DatabaseError as e:
            print(f"trustdb: cannot close the installer window: {e}", file=sys.stderr, flush=True)
            return
        for p in revoked:
            line = (f"trustdb: revoked {p}: written by a package manager, but its content is not "
                    "what the package database records")
            self.reports.append(line)
            print(line, file=sys.stderr, flush=True)
        self.trusted.clear()
        if self._engine is not None:
            self._engine.refresh()

    # --- events

    def pump(self) -> int:
        """Trust what installers (and compilers) closed since the last call; returns how many
        files."""
        with self._lock:
            exited = [(w, w.exited()) for w in self._exec_watches()]
            found = self._closed.collect()
            for watch, pids in exited:
                watch.forget(pids)  # their events were all queued before we drained
            if found:
                self._record(found)
            return len(found)

    def _drain(self) -> list[Event]:
        try:
            return list(self._fan.read(65536))
        except BlockingIOError:
            return []

    def _exec_watches(self) -> list[CompilerWatch]:
        return [self._installer_execs] + ([self.compilers] if self.compilers else [])

    def _on_exec(self, ev: Event) -> None:
        if ev.mask & FAN_OPEN_EXEC:
            for watch in self._exec_watches():
                watch.on_exec(ev.fd, ev.pid)

    def _writer(self, pid: int) -> Writer | None:
        """Whose trust a close by `pid` carries: a trusted installer's while a window is open,
        a trusted compiler's when the policy trusts outputs, else none."""
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
            if writer.kind == SOURCE_KIND:
                self.trusted[entry.path] = entry.digest
            else:
                print(f"trustdb: trusted {entry.path} ({writer.origin})", file=sys.stderr,
                      flush=True)

    # --- the first-seen path

    def wrap_trust(self, opener: OpenTrust) -> OpenTrust:
        """How the first-seen handler opens the database: as `opener` does, but a digest the
        database does not trust while a window is open is asked of the daemon."""
        return _AskingOpener(opener, self._ask_handler, always_ask=self.compilers is not None)


@dataclass(frozen=True, slots=True)
class _AskingOpener:
    """The handler's OpenTrust. The handler closes every fd it inherited but `inherited_fds`:
    the question channel must survive that (else every question fails, and the fd number, once
    reused, is another file's)."""

    opener: OpenTrust
    ask: socket.socket
    always_ask: bool

    @property
    def inherited_fds(self) -> tuple[int, ...]:
        return (self.ask.fileno(),)

    def __call__(self) -> TrustLookup:
        return _InstallerAwareTrust(self.opener(), self.ask, always_ask=self.always_ask)


class _InstallerAwareTrust:
    """The handler's TrustLookup (runs in the handler process)."""

    def __init__(self, db: TrustLookup, ask: socket.socket, *, always_ask: bool = False) -> None:
        self._db = db
        self._ask: socket.socket | None = ask
        self._seq = 0
        self._always_ask = always_ask
        """With trusted compiler outputs: a miss may be what a compiler closed a moment ago."""
        self._asking = False
        self._serve: tuple[int, Callable[[], None]] | None = None
        self._may_ask: Callable[[], bool] = lambda: True

    @property
    def generation(self) -> int:
        return self._db.generation

    def digest_cache(self):  # type: ignore[no-untyped-def]
        return self._db.digest_cache()

    def serve_while_waiting(self, fd: int, serve: Callable[[], None],
                            may_ask: Callable[[], bool]) -> None:
        """While a question is out, call `serve` whenever `fd` (the handler's permission group)
        is readable, and once at the start: the daemon may be blocked in an open that waits for
        the handler, and must be answered before it can answer us. `may_ask` is False while
        the event being decided is the daemon's own (it cannot answer while it waits on us)."""
        self._serve = (fd, serve)
        self._may_ask = may_ask

    def is_trusted(self, digest: bytes) -> bool:
        if self._db.is_trusted(digest):
            return True
        if self._ask is None or self._asking or not self._may_ask():
            return False  # the daemon's own event: it is blocked until we answer it
        if not self._always_ask and not any(WINDOW_DIR.glob("*.open")):  # a stat and a readdir
            return False
        self._seq += 1
        seq = self._seq.to_bytes(_SEQ, "little")
        self._asking = True
        try:
            self._ask.send(seq + digest)
            answer = self._answer(seq, time.monotonic() + ASK_TIMEOUT_S)
            if TRACE:
                print(f"trustdb: close-write: the handler asked about {digest.hex()[:16]}: {answer}",
                      file=sys.stderr, flush=True)
            return answer
        except OSError as e:
            print(f"trustdb: first-seen handler: the daemon's question channel failed ({e}); "
                  "files installers write are untrusted until the daemon restarts",
                  file=sys.stderr, flush=True)
            self._ask.close()
            self._ask = None
        finally:
            self._asking = False
        return False

    def _serve_daemon(self) -> None:
        """One failed answer must not cost the question channel (is_trusted closes it on
        OSError): the handler counts its own errors."""
        assert self._serve is not None
        with contextlib.suppress(Exception):
            self._serve[1]()

    def _answer(self, seq: bytes, deadline: float) -> bool:
        assert self._ask is not None
        poller = select.poll()
        poller.register(self._ask.fileno(), select.POLLIN)
        if self._serve is not None:
            poller.register(self._serve[0], select.POLLIN)
            self._serve_daemon()  # its events already read with the one being decided
        while (left := deadline - time.monotonic()) > 0:
            ready = {fd for fd, _ in poller.poll(max(1, int(left * 1000)))}
            if self._serve is not None and self._serve[0] in ready:
                self._serve_daemon()
            if self._ask.fileno() in ready:
                try:
                    answer = self._ask.recv(_SEQ + 1, socket.MSG_DONTWAIT)
                except BlockingIOError:
                    continue
                if answer[:_SEQ] == seq:  # a late answer to an earlier question is dropped
                    return answer[_SEQ:] == b"1"
        print(f"trustdb: first-seen handler: the daemon did not answer within {ASK_TIMEOUT_S:.0f} s;"
              " not trusted", file=sys.stderr, flush=True)
        return False  # the daemon is busy: not trusted now


# --- the hooks' side (`trustdb service installer-begin|end`) -----------------------------------


def installer_pid() -> int:
    """The package manager that runs this hook: the parent of the hook's shell."""
    ppid = os.getppid()
    try:
        stat = Path(f"/proc/{ppid}/stat").read_text()
        grand = int(stat.rsplit(")", 1)[1].split()[1])
    except (OSError, ValueError, IndexError):
        return ppid
    try:
        exe = os.readlink(f"/proc/{ppid}/exe")
    except OSError:
        exe = ""
    return ppid if exe in INSTALLERS else grand


def begin(daemon_pids: list[int], timeout_s: float = 10.0) -> bool:
    """Open a window and wait until the daemon has marked the filesystems; False if no daemon
    answered (nothing is enforcing, or it is not running: then new files stay untrusted)."""
    WINDOW_DIR.mkdir(parents=True, exist_ok=True)
    token = f"w{os.getpid()}-{time.time_ns()}"
    (WINDOW_DIR / f"{token}.open").write_text(str(installer_pid()))
    return _signal_and_wait(daemon_pids, WINDOW_DIR / f"{token}.ack", timeout_s)


def end(daemon_pids: list[int], timeout_s: float = 30.0) -> bool:
    """Close this installer's windows (call after the package database was imported)."""
    pid = installer_pid()
    for w in open_windows():
        if w.installer_pid == pid:
            with contextlib.suppress(OSError):
                (WINDOW_DIR / f"{w.token}.open").unlink()
            with contextlib.suppress(OSError):
                (WINDOW_DIR / f"{w.token}.ack").unlink()
    return _signal_and_wait(daemon_pids, None, timeout_s)


def _signal_and_wait(pids: list[int], ack: Path | None, timeout_s: float) -> bool:
    import signal

    alive = []
    for pid in pids:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGUSR1)
            alive.append(pid)
    if not alive or ack is None:
        return bool(alive)
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if ack.exists():
            return True
        time.sleep(0.01)
    return False
