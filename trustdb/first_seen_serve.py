"""The first-seen handler process itself (trustdb.first_seen_handler forks it): its
configuration and outputs, and the loop that answers the tree's fanotify permission events
(trustdb.first_seen decides each one).
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import json
import mmap
import os
import select
import signal
import struct
import sys
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from trustdb.abi import VOUCHED_BIT
from trustdb.denial_stderr import tell_live_holder, write_to_stderr_of
from trustdb.fanotify import (
    FAN_ATTRIB,
    FAN_MOVE_SELF,
    FAN_NOFD,
    FAN_OPEN_EXEC_PERM,
    FAN_OPEN_PERM,
    Event,
    Fanotify,
    FanotifyError,
)
from trustdb.first_seen import (
    NO_INTERPRETERS,
    Checked,
    FirstSeen,
    Interpreters,
    KeyMap,
    OpenTrust,
    Outcome,
    answer,
    has_writers,
    is_script_for,
)
from trustdb.first_seen_marks import (
    HandlerError,
    event_path,
    mask_for,
    may_vouch,
    settled_data,
    watch_writes,
)
from trustdb.first_seen_process import close_inherited, forget_parent_lmdb_envs, realtime
from trustdb.held_stderr import HeldStderrs, may_be_killed
from trustdb.inline_code import inline_refusal, interpreter_program, is_libc, listed
from trustdb.model import InodeKey
from trustdb.script_args import runs_data_applet
from trustdb.script_files import ScriptFiles
from trustdb.write_opens import TRUNCATE, opening_for_write, opening_paths

PERM_MASK = FAN_OPEN_EXEC_PERM | FAN_OPEN_PERM
CHANGE_MASK = FAN_ATTRIB | FAN_MOVE_SELF
GENERATION_POLL_S = 1.0
START_TIMEOUT_S = 30.0

STATS_NAMES = ("events", "exec_events", "unconfined", "hashed", "inserted", "denied", "ignored",
          "ignore_flushes", "errors")
STATS_FORMAT = struct.Struct(f"={len(STATS_NAMES)}Q")
_PR_SET_PDEATHSIG = 1


@dataclass(frozen=True, slots=True)
class Denial:
    """One answer FAN_DENY (or, in audit mode, one that would have been)."""

    tgid: int
    path: str
    dev: int
    """Kernel encoding, as in InodeKey."""
    ino: int
    what: str
    """`exec` (untrusted content executed) or `script` (an interpreter loading it)."""
    denied: bool


@dataclass(frozen=True, slots=True)
class HandlerConfig:
    open_trust: OpenTrust
    keys: KeyMap
    is_confined: Callable[[int], bool] | None
    """pidfd -> carries the confinement mark (None: every task counts, the service)."""
    enforce: bool
    interpreters: Interpreters = NO_INTERPRETERS
    db_option: str = ""
    """` --db PATH` for the `trustdb trust` command in denial lines ('' for the default)."""
    enforce_for: Callable[[int], bool] | None = None
    """pid -> enforced? (the service's per-uid and per-cgroup modes, trustdb.service.modes);
    None: `enforce` for every task."""
    deny_trusted_writes: bool = False
    """Refuse confined tasks write opens of trusted files (runs only: the service would refuse
    the whole machine, package managers included)."""
    events_fd: int = -1
    """The backend's ring buffer map (its positions tell when a kill's line has come)."""
    tree_cgroup: str = ""
    """The run's cgroup: a line with no held stderr goes to a live holder inside it."""


# --- the handler process ------------------------------------------------------------------------


class Serve:
    def __init__(self, config: HandlerConfig, stats: mmap.mmap, ctl: int, report: int) -> None:
        self.config = config
        self.stats_map = stats
        self.counts = dict.fromkeys(STATS_NAMES, 0)
        self.ctl = ctl
        self.report = report
        self.reported: set[tuple[int, InodeKey | None]] = set()
        self.script_files = ScriptFiles(open_paths=opening_paths)
        self._fail_closed = False
        """The event being decided is a confined task's non-exec open (see _on_permission)."""
        self.vouched = False
        """The BPF side reads our ignore marks (bpf/vouch.bpf.h, td_vouched_by_handler)."""
        self.ctl_buffer = b""
        self.stopping = False
        self.backlog: deque[Event] = deque()
        """Permission events read but not answered yet (see `_answer_parent`)."""
        self.parent = 0
        self.deciding_for = 0
        """The pid whose event is being decided (no question to the daemon about its own)."""

    def run(self, targets: list[str], how: str) -> int:
        ctypes.CDLL(None).prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)
        self.parent = os.getppid()
        if self.parent == 1:
            return 1
        signal.signal(signal.SIGINT, signal.SIG_IGN)  # the supervisor forwards ^C to the tree
        realtime()
        perm = Fanotify.permission()
        changes = Fanotify.inode_changes()
        inherited = getattr(self.config.open_trust, "inherited_fds", ())
        close_inherited({self.ctl, self.report, perm.fd, changes.fd, *inherited})
        forget_parent_lmdb_envs()
        trust = self.config.open_trust()
        serve_while_waiting = getattr(trust, "serve_while_waiting", None)
        if serve_while_waiting is not None:
            serve_while_waiting(perm.fd, self._answer_parent,
                                lambda: self.deciding_for != self.parent)
        self.first_seen = FirstSeen(trust, self.config.keys)
        self.generation = trust.generation
        marked = 0
        for target in targets:
            mask = mask_for(target, PERM_MASK, FAN_OPEN_PERM,
                            interpreters=bool(self.config.interpreters))
            if not mask:
                continue
            try:
                if how == "mount":
                    perm.mark_mount(target, mask)
                else:
                    perm.mark_filesystem(target, mask)
                marked += 1
            except FanotifyError as e:
                if e.errno != errno.ENOENT:  # a vanished mount point is no gap; say the rest
                    print(f"trustdb: first-seen handler: {target} not marked: {e}",
                          file=sys.stderr, flush=True)
        if not marked:
            raise HandlerError("no mount could be marked")
        self.perm, self.changes = perm, changes
        os.write(self.report, f"R {perm.fd}\n".encode())
        self._loop()
        return 0

    def _loop(self) -> None:
        poller = select.poll()
        for fd in (self.ctl, self.changes.fd, self.perm.fd):
            poller.register(fd, select.POLLIN)
        os.set_blocking(self.ctl, False)
        self.held = HeldStderrs(self.config.events_fd, poller, self._is_trusted_inode)
        try:
            self._serve(poller)
        finally:
            self.held.close()

    def _serve(self, poller: select.poll) -> None:
        next_gen = time.monotonic() + GENERATION_POLL_S
        while not self.stopping:
            settle = self.held.poll_timeout_ms()
            timeout = int(GENERATION_POLL_S * 1000) if settle is None else settle
            ready = {fd for fd, _ in poller.poll(timeout)}
            if self.ctl in ready:
                self._read_ctl()
            for fd in ready:
                if self.held.owns(fd):
                    self.held.exited(fd)
            self.held.settle(self._read_ctl)
            if self.changes.fd in ready:
                self._on_changes()
            if self.perm.fd in ready:
                self.backlog.extend(self.perm.read())
                while self.backlog:
                    self._on_permission(self.backlog.popleft())
            if time.monotonic() >= next_gen:
                next_gen = time.monotonic() + GENERATION_POLL_S
                self._check_generation()
            STATS_FORMAT.pack_into(self.stats_map, 0, *self.counts.values())

    def _read_ctl(self) -> None:
        """The supervisor's lines: `V` (vouching is on), `K {json}` (a BPF denial's line for
        the denied task's stderr); EOF: stop."""
        try:
            while chunk := os.read(self.ctl, 65536):
                self.ctl_buffer += chunk
            self.stopping = True  # EOF
        except BlockingIOError:
            pass
        *lines, self.ctl_buffer = self.ctl_buffer.split(b"\n")
        for line in lines:
            if line == b"V":
                self.vouched = True
            elif line.startswith(b"K "):
                with contextlib.suppress(Exception):
                    self._tell(json.loads(line[2:]))

    def _tell(self, kill: dict[str, Any]) -> None:
        tgid, ppid, line = int(kill["tgid"]), int(kill["ppid"]), str(kill["line"])
        told = self.held.tell(tgid, int(kill["dev"]), int(kill["ino"]), line)
        if not told and self.config.tree_cgroup:
            tell_live_holder(tgid, ppid, line, cgroup=self.config.tree_cgroup,
                             is_trusted=self._is_trusted_inode)

    def _is_trusted_inode(self, st: os.stat_result) -> bool:
        """Trusted content is never a place for our lines (denial_stderr)."""
        key = InodeKey.from_stat(st)
        return key in self.config.keys or key in self.first_seen.inserted

    def _answer_parent(self) -> None:
        """Called while a question to the daemon (our parent) is out (trustdb.service.installers):
        the daemon may itself be blocked in an open that waits for our answer (a log line, a
        window token, a lazy import), and would then never answer us. Its events are answered
        now (without asking it anything); everyone else's wait in the backlog."""
        poller = select.poll()
        poller.register(self.perm.fd, select.POLLIN)
        if poller.poll(0):
            self.backlog.extend(self.perm.read())
        mine = [ev for ev in self.backlog if ev.pid == self.parent]
        if mine:
            self.backlog = deque(ev for ev in self.backlog if ev.pid != self.parent)
            for ev in mine:
                self._on_permission(ev)

    def _on_changes(self) -> None:
        """A watched inode's ctime moved (chmod, link, rename, utime, xattr): its key is stale
        and its ignore mark must go before its next exec. One flush drops them all (which
        inode it was matters less than how fast the mark goes). Once the BPF side takes our
        ignore marks as vouching for unmodified content (`vouched`), a stale key no longer
        kills, and the marks stay: flushing them would only destroy that evidence."""
        if any(True for _ in self.changes.read()) and not self.vouched:
            self._flush()

    def _flush(self) -> None:
        self.perm.flush_inode_marks()
        self.changes.flush_inode_marks()
        self.counts["ignore_flushes"] += 1

    def _check_generation(self) -> None:
        try:
            generation = self.first_seen.trust.generation
        except Exception:  # noqa: BLE001 - a busy database: try again next time
            return
        if generation != self.generation:
            self.generation = generation
            self._flush()
            self.first_seen.forget_untrusted()

    def _on_permission(self, ev: Event) -> None:
        if ev.fd == FAN_NOFD:
            return
        allow = True
        self._fail_closed = False
        outer, self.deciding_for = self.deciding_for, ev.pid
        try:
            self.counts["events"] += 1
            self.counts["exec_events"] += bool(ev.mask & FAN_OPEN_EXEC_PERM)
            allow = self._decide(ev)
        except Exception as e:  # noqa: BLE001 - never leave an open waiting
            self.counts["errors"] += 1
            # A confined task's non-exec open is judged here alone (a script load), and the
            # tree chooses what the parsing reads (its cmdline, environ, names): an error
            # refuses it in enforce mode. An exec is judged again by the BPF side (its key is
            # not in the map unless we inserted it), and the service's opens are the whole
            # machine's, where a refusal on our bug would break unrelated work: those allow.
            if self._fail_closed and self.config.enforce:
                allow = False
                with contextlib.suppress(OSError):
                    os.write(self.report, f"E {type(e).__name__}: {e}\n".encode()[:4000])
        finally:
            self.deciding_for = outer
            try:
                self.perm.respond(ev.fd, allow)
            finally:
                os.close(ev.fd)

    def _decide(self, ev: Event) -> bool:
        try:
            pidfd = os.pidfd_open(ev.pid)
        except OSError:
            return True
        try:
            if self.config.is_confined is not None and not self.config.is_confined(pidfd):
                self.counts["unconfined"] += 1
                return True
            is_exec = bool(ev.mask & FAN_OPEN_EXEC_PERM)
            self._fail_closed = self.config.is_confined is not None and not is_exec
            script = False
            if not is_exec and self.config.interpreters:
                if self.config.interpreters.deny_inline and is_libc(event_path(ev.fd)):
                    refusal = inline_refusal(ev.pid, self.config.interpreters.deny_inline,
                                             self._interpreter_of)
                    if refusal:
                        return self._refuse_inline(ev, pidfd, refusal)
                interpreter = self._interpreter(ev.pid)
                script = interpreter is not None and self._is_script(ev, interpreter)
            hashed = self.first_seen.hashed
            checked = self.first_seen.check(ev.fd, code=script)
            self.counts["hashed"] += self.first_seen.hashed - hashed
            self.counts["inserted"] += checked.outcome == Outcome.INSERTED
            known = checked.outcome in (Outcome.KNOWN, Outcome.INSERTED)
            writable = known and self.config.deny_trusted_writes and watch_writes(ev.fd)
            enforce = self.config.enforce
            if self.config.enforce_for is not None and not known:
                enforce = self.config.enforce_for(ev.pid)
            verdict = answer(checked, is_exec=is_exec, enforce=enforce,
                             script_for_interpreter=script, open_mask=FAN_OPEN_PERM,
                             exec_mask=FAN_OPEN_EXEC_PERM,
                             write_open=writable and not is_exec and self._write_open(ev),
                             writable_mount=writable)
            mask = verdict.ignore_mask
            if (self.config.interpreters and checked.outcome not in (Outcome.KNOWN,
                                                                      Outcome.INSERTED)
                    and checked.key is not None and not settled_data(ev.fd, checked)):
                mask = 0  # a file read as data now may be loaded as a script later (a device
                # or FIFO, key None, is never judged as content: its marks stay)
            if self.config.interpreters.deny_inline and is_libc(event_path(ev.fd)):
                mask &= FAN_OPEN_EXEC_PERM  # its opens are where inline code is refused
            if mask and known and may_vouch(ev.fd,
                                            writes_refused=self.config.deny_trusted_writes):
                mask |= VOUCHED_BIT  # the BPF side may trust it if only its ctime moves
            if mask:
                self._ignore(ev.fd, checked, mask)
            if (verdict.allow and self.config.enforce and self._run_tree
                    and may_be_killed(ev.fd, checked, is_exec)):
                key = checked.key
                self.held.hold(ev.pid, pidfd, key.dev if key else 0, key.ino if key else 0,
                               checked.digest)
            if verdict.denial:
                self._report(ev, pidfd, verdict.denial, checked, denied=not verdict.allow)
            return verdict.allow
        finally:
            os.close(pidfd)

    def _ignore(self, fd: int, checked: Checked, mask: int) -> None:
        """Ignore later events of this inode, watched for ctime changes first; if its ctime
        moved meanwhile, take the marks back (its key is already stale)."""
        try:
            self.changes.mark_inode_fd(fd, CHANGE_MASK)
            self.perm.ignore_inode_fd(fd, mask)
        except FanotifyError:
            return  # e.g. a filesystem without file handles: keep asking
        if checked.key is not None and InodeKey.from_stat(os.fstat(fd)) != checked.key:
            self._flush()
            return
        self.counts["ignored"] += 1

    def _write_open(self, ev: Event) -> bool:
        """A confined task opening trusted content for writing (route 3: the bytes a trusted
        key vouches for must not change under it). Its write access is already taken while it
        waits here, so a read lease is refused; the syscall's flags say it is the opener.
        O_RDONLY | O_TRUNC takes no write access before this event: only its flags tell."""
        if not self.config.deny_trusted_writes:
            return False
        if has_writers(ev.fd):
            return bool(opening_for_write(ev.pid))
        return bool(opening_for_write(ev.pid, TRUNCATE))

    def _interpreter(self, pid: int) -> tuple[str, int] | None:
        """The interpreter's name if `pid` runs one (known by its exe's key or content, or
        the program ld.so runs), and where its argv starts in the cmdline."""
        return interpreter_program(pid, self._interpreter_of)

    def _interpreter_of(self, st: os.stat_result, exe: str) -> str | None:
        interpreters = self.config.interpreters
        key = InodeKey.from_stat(st)
        if key in interpreters.keys:
            return exe
        if interpreters.digests:
            cached = self.first_seen.trust.digest_cache().lookup(key, st.st_size)
            digest = cached.blake3 if cached else self.first_seen.inserted.get(key)
            if digest in interpreters.digests:
                return interpreters.name_of(digest) or exe
        return None

    def _is_script(self, ev: Event, program: tuple[str, int]) -> bool:
        try:
            st = os.fstat(ev.fd)
            head = os.pread(ev.fd, 2, 0)
            path = os.readlink(f"/proc/self/fd/{ev.fd}")
        except OSError:
            return False
        interpreter, at = program
        if os.path.basename(interpreter).startswith("busybox") and runs_data_applet(ev.pid, at):
            return False  # `busybox cat x.sh` reads it: no file a data applet opens is code
        by_name = not listed(interpreter, self.config.interpreters.read_sources)
        identity = (st.st_dev, st.st_ino)
        return (is_script_for(path, head, identity, (), by_name=by_name)
                or self.script_files.is_code(ev.pid, interpreter, identity, at))

    @property
    def _run_tree(self) -> bool:
        """A `run` tree's handler. The service's never touches a task's fd 2: any user can
        point it at a FUSE file whose fstat never returns, which would stall every open on the
        host; its decisions go to the journal, and the task gets its EPERM."""
        return self.config.is_confined is not None

    def _tell_task(self, pidfd: int, line: str) -> None:
        if self._run_tree:
            write_to_stderr_of(pidfd, line, self._is_trusted_inode)

    def _refuse_inline(self, ev: Event, pidfd: int, refusal: str) -> bool:
        """deny_inline (trustdb.inline_code): the interpreter's C library open is refused."""
        enforce = self.config.enforce
        line = (f"trustdb: {'denied' if enforce else 'would deny (audit)'} inline code of "
                f"{refusal} (pid {ev.pid}): the policy refuses inline code for this "
                "interpreter (deny_inline); put the code in a trusted file")
        self.counts["denied"] += enforce
        if enforce:
            self._tell_task(pidfd, line)
        key = InodeKey.from_stat(os.fstat(ev.fd))
        denial = Denial(ev.pid, refusal, key.dev, key.ino, "inline", enforce)
        with contextlib.suppress(OSError):
            os.write(self.report, b"D " + json.dumps(_asdict(denial)).encode() + b"\n")
        return not enforce

    def _report(self, ev: Event, pidfd: int, what: str, checked: Checked, *,
                denied: bool) -> None:
        """Tell the supervisor (log, its stderr) and, once per process and file, the blocked
        task itself: a shell retries an exec along $PATH."""
        key = checked.key
        once = (ev.pid, key)
        if once in self.reported:
            return
        if len(self.reported) > 4096:
            self.reported.clear()
        self.reported.add(once)
        path = event_path(ev.fd)
        self.counts["denied"] += denied
        if what == "write":
            line = (f"trustdb: denied write open of {path} (pid {ev.pid}): its content is "
                    "trusted, and trusted files may not be modified inside trustdb run (write a "
                    "new file instead)")
        else:
            thing = "exec" if what == "exec" else "script load (by an interpreter)"
            line = (f"trustdb: denied {thing} of {path} (pid {ev.pid}): its content is not in "
                    f"the trust database. To trust it: trustdb trust{self.config.db_option} "
                    f"{path}")
        if checked.digest is not None and what != "write":
            line += f" (content blake3 {checked.digest.hex()})"
        if denied:
            self._tell_task(pidfd, line)
        denial = Denial(ev.pid, path, key.dev if key else 0, key.ino if key else 0, what, denied)
        with contextlib.suppress(OSError):
            os.write(self.report, b"D " + json.dumps(_asdict(denial)).encode() + b"\n")


def _asdict(d: Denial) -> dict[str, object]:
    return {name: getattr(d, name) for name in Denial.__slots__}


__all__ = ["Denial", "HandlerConfig", "HandlerError", "Serve"]
