"""One interface for every kernel enforcement backend (fapolicyd's `backend` struct, in Python).

A backend owns one BPF object: it probes whether this kernel accepts it, loads it with the
engine's configuration, attaches, exposes the map the mirror fills and the ring buffer the event
log reads, and detaches. The engine picks the strongest backend whose probe succeeds
(`trustdb.backends.select`), and says which one runs.
"""

from __future__ import annotations

import abc
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from trustdb.abi import Mode
from trustdb.model import InodeKey

# Holes both backends share (bpf/lsm_script.bpf.h, bpf/common.bpf.h say why).
COMMON_HOLES: tuple[str, ...] = (
    ("inline-code: python3 -c, bash -c, node -e and code on an interpreter's stdin are never a "
    "file: refused in `run` only for the interpreters a policy lists in deny_inline (off in "
    "agent: agents run bash -c all the time), and not for a statically linked interpreter "
    "(no C library open to refuse); eval() of strings and code typed into an interactive "
    "interpreter are out of every backend's reach"),
    ("interpreter-args: an interpreter's script is the file its command line names, read as "
    "that interpreter reads it (trustdb.script_args): an option we do not know that takes a "
    "separate value is judged both ways; a trusted script that itself runs a file it reads "
    "(exec(open(x).read()), source \"$1\") is trusted code choosing to do so; the name an "
    "open was given is read from the opener's syscall on x86_64 only (elsewhere a name "
    "swapped under the open is caught only when the handler's own look sees the same file), "
    "and a shell's rc files are matched by the file their name reaches at the handler's look"),
    ("forged-device-keys: a key names a device by its number, and a user can give a device of "
    "their own (a loop-mounted image, a FUSE mount) a number another one had: under the "
    "service, a first-seen key inserted for a file on such a device stays in the map after the "
    "device is gone, and a filesystem of theirs at the reused number, with that inode and "
    "ctime and other bytes, would be let through with it (reported by review, not reproduced "
    "here); a start never primes keys of devices other than the system trees' (Mirror.prime)"),
    ("dnf5-untested: the dnf5 actions hook (packaging/hooks/dnf) that opens the trusted-"
    "installer window around a dnf5 transaction has never run against a real dnf5 (Debian 12 "
    "has none); dnf4's plugin and rpm by hand are tested under enforce"),
    ("noexec-service: the service marks exec-capable filesystems only, so a script on a "
    "filesystem mounted only noexec (python3 /dev/shm/evil.py) is not judged by the service; "
    "`run` marks the tree's noexec mounts for open events while interpreters are judged"),
    ("read-sources: for the interpreters a policy lists in read_sources (agent: node, which "
    "reads the project's sources as data) a file named like a script is judged only when "
    "their command line names it: a trusted tool's require() of an untrusted module in the "
    "project runs"),
    ("git-redirect-window: a new .git/commondir, config.worktree or gitdir planted in a "
    "protected .git is removed one inotify round trip after it appears; a git started by the "
    "user outside in that moment would read it; a repository the tree creates itself (git "
    "init, a bare one, a .git file) is disarmed when the run ends (config, hooks, commondir "
    "moved aside, its .git handed to uid nobody, which git's discovery refuses), but while "
    "the run lasts a git started outside there runs them"),
    ("git-nested-repos: a submodule entry of a protected repository that the tree added or "
    "whose config, hooks or redirects it changed is set aside at the end of the run (its .git "
    "renamed), since the user's next `git status` would enter it with its own config; until "
    "then, a git started by the user outside while the run is active would run it"),
    "unconfined-writers: in a `run` scope a process outside the tree can still write into a "
    "file the tree has mapped; exec and mmap refuse files with writers only at that moment "
    "(and stores through a shared mapping made outside raise no modify event, so the "
    "first-seen handler's ignore mark keeps vouching for that inode). The mark vouches only "
    "where no writer in scope can change the bytes unseen (a read-only mount, a watched file "
    "in `run`, a root-owned file nobody else may write under the service): a user's own "
    "copy of a trusted binary is asked about again after each chmod, and an exec racing that "
    "chmod may be denied (a false denial, never a route)",
    "memfd-copies: a memfd (or other unmarkable file) holding a copy of trusted content is "
    "denied: fanotify cannot mark memfd files, so no first-seen check inserts its key, and "
    "neither kernel has in-kernel hashing the programs could use here (IMA/fs-verity off); "
    "a false denial, never a route",
    "wx-system-wide: anonymous executable memory (JITs) is refused inside `run` only; the "
    "system-wide service leaves it to the policy's seccomp/MDWE",
    ("service-modes-root: the service's per-uid and per-cgroup audit modes are decided by the "
    "kernel per task, but root can put a task there: move it into a listed audit cgroup "
    "(each such move is logged, reason tamper_mode_move) or change its uid to an audit uid "
    "(not logged). Audit rules apply only to cgroups root alone can move tasks into "
    "(delegated ones are refused); a `run` tree is decided by its own engine and never by them; "
    "a listed enforce cgroup created after the daemon has its parent's mode until the next "
    "5 s check"),
    "overlayfs: mappings on overlayfs or FUSE passthrough are backed by another file than the "
    "fd's; the tracepoint backend fails closed on them, and (dev, ino) keys there are unreliable",
)


class BackendError(Exception):
    """Base error of the enforcement stage: one line, shown to the user as is."""


class MapFullError(BackendError):
    """The kernel's trusted-inode map has no room: the first `inserted` keys of the batch
    went in, the rest did not (they stay untrusted: fail closed)."""

    def __init__(self, message: str, inserted: int) -> None:
        super().__init__(message)
        self.inserted = inserted


@dataclass(frozen=True, slots=True)
class Probe:
    """Whether this kernel accepts a backend, and why not."""

    ok: bool
    reason: str
    """`loaded and attached a test program` or `BPF LSM refused: EPERM (bpf not in lsm=)`."""


@dataclass(frozen=True, slots=True)
class Scope:
    """What is enforced on. `cgroup_id == 0` means the whole system (service mode only)."""

    cgroup_id: int = 0
    cgroup_path: str = ""
    cgroup_level: int = 0
    """Depth below the cgroup2 root (the root itself is 0); the BPF side needs it to find the
    scope among a task's ancestors."""

    @property
    def system_wide(self) -> bool:
        return self.cgroup_id == 0

    @classmethod
    def for_cgroup(cls, path: str | os.PathLike[str]) -> Scope:
        """The scope of an existing cgroup v2 directory (e.g. /sys/fs/cgroup/unified/x).

        A cgroup v2 id is the inode number of its directory; its level is how many parents
        share its filesystem."""
        p = Path(path).resolve()
        st = os.stat(p)
        if not (p / "cgroup.procs").exists() or not (p / "cgroup.controllers").exists():
            raise BackendError(f"{p} is not a cgroup v2 directory")
        level = 0
        while p.parent != p and os.stat(p.parent).st_dev == st.st_dev:
            p = p.parent
            level += 1
        if level == 0:
            raise BackendError(f"{path} is the cgroup2 root: that is the whole system")
        return cls(cgroup_id=st.st_ino, cgroup_path=str(Path(path).resolve()), cgroup_level=level)


DEFAULT_MAX_ENTRIES = 1 << 20


@dataclass(frozen=True, slots=True)
class EngineConfig:
    mode: Mode
    scope: Scope
    max_entries: int | None = None
    """Size of the trusted-inode map (set before load). None: the engine session sizes it from
    the database (`mirror.map_size_for`); a backend loaded without one uses DEFAULT_MAX_ENTRIES."""
    supervisor_tgid: int = 0
    """The trustdb process that confined tasks must not signal, trace or stop."""
    log_allows: bool = False
    """Also send an event for every allowed exec/mapping (noisy: for debugging)."""
    events_bytes: int = 1 << 22
    """Size of the decision ring buffer (a power of two, at least one page)."""


class KeySink(Protocol):
    """Where the mirror puts trusted inode keys: the backend's kernel map (or a test fake)."""

    def add(self, keys: Sequence[InodeKey]) -> None: ...

    def remove(self, keys: Sequence[InodeKey]) -> None: ...


class Backend(abc.ABC):
    name: str
    """`lsm` or `tracepoint`: shown in `trustdb status` and in every decision event."""
    strength: int
    """Higher is stronger; the engine tries backends from the strongest down."""
    guarantees: str = ""
    """One paragraph for `trustdb status`: what this backend enforces and how (EPERM/SIGKILL)."""
    holes: tuple[str, ...] = ()
    """Routes to untrusted code this backend cannot close, each `name: why` (one line), shown
    by `trustdb backends` and listed in the README: no silent gaps."""
    refused: tuple[tuple[str, str], ...] = ()
    """Set by `select`: stronger backends this kernel refused, with the reason for each."""
    probe_is_load: bool = False
    """True when `probe` proves nothing a real `load` does not: `select_loaded` then skips it
    and treats a failed load as the refusal (each object is loaded once)."""

    @abc.abstractmethod
    def probe(self) -> Probe:
        """Try this kernel without enforcing anything (load a program, detach at once)."""

    @abc.abstractmethod
    def load(self, config: EngineConfig) -> None:
        """Open and load the BPF object with `config` in its read-only data. Raises BackendError."""

    @abc.abstractmethod
    def attach(self) -> None:
        """Start deciding. Everything attached is held by this process's fds (no pins)."""

    @abc.abstractmethod
    def detach(self) -> None:
        """Stop deciding and free everything; idempotent, safe after a failed load/attach."""

    @property
    @abc.abstractmethod
    def trusted_inodes(self) -> KeySink:
        """The kernel map of trusted inode keys, which the mirror fills."""

    @property
    @abc.abstractmethod
    def events_fd(self) -> int:
        """fd of the ring buffer map that carries `struct td_event` records."""

    @abc.abstractmethod
    def confine(self, pidfd: int) -> None:
        """Mark one task as confined; its descendants inherit the mark at fork, and it follows
        the task whatever cgroup or namespace it moves to."""
