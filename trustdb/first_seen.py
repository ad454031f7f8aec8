"""The first-seen path: what the fanotify handler answers for one file a confined task opens.

The kernel map is keyed by inode version (dev, ino, ctime), so a copy of a trusted binary or
library, or a trusted file after chmod, rename or link, misses in the kernel although its
content is trusted (`trustdb check` says so). The permission event of the open (exec, or the
plain open that ld.so / dlopen / ctypes make before mmap) arrives while the opener is blocked:
`FirstSeen.check` hashes the file through the event's fd and inserts its key when the content is
trusted, so that the BPF check that follows passes. `answer` then says what fanotify replies and
which later events of this inode need no round trip (the ignore mark):

| outcome                    | answer (confined, enforce)       | later events of the inode      |
| -------------------------- | -------------------------------- | ------------------------------ |
| key in the map / inserted  | allow                            | ignored (open and exec; only   |
|                            |                                  | exec on a writable mount)      |
| trusted, opened for write  | DENY (EPERM)                     | asked again                    |
| not executable content     | allow                            | ignored (open and exec)        |
| untrusted executable       | exec: DENY (EPERM); open: allow  | opens ignored, execs still ask |
| script of an interpreter   | DENY the interpreter's open      | asked again                    |
| cannot tell (see reasons)  | allow: the BPF programs decide   | asked again                    |

A DENY is a courtesy (EPERM and a readable line instead of SIGKILL): fail-closed stays in the
kernel, because fanotify allows everything once its listener is gone. Nothing outside the tree
is ever denied: events of tasks without the confinement mark are allowed untouched.
"""

from __future__ import annotations

import enum
import fcntl
import os
import stat as statmod
from collections.abc import Callable, Collection, Mapping
from dataclasses import dataclass, field
from typing import Protocol

from trustdb.fskeys import (
    MULTIGRAIN_FS,
    coarse_now_ns,
    ctime_settled_at,
    fs_magic,
    kernel_has_multigrain,
    kernel_keys,
    wait_for_coarse_clock,
)
from trustdb.hashing import HashingError, NotExecutable, classify, hash_fd, is_script_name
from trustdb.model import FileDigests, FileKind, InodeKey

MAX_FIRST_SEEN_WAIT_NS = 20_000_000
"""How long a first-seen file may wait for its ctime tick (coarse-ctime kernels): it holds up an
open of the confined tree."""

MAX_REMEMBERED = 4096
"""Untrusted digests remembered per key (an untrusted binary run in a loop is read once)."""

_F_SETLEASE = 1024
_F_RDLCK, _F_UNLCK = 0, 2


class Outcome(enum.Enum):
    KNOWN = "in the kernel map"
    INSERTED = "trusted content: key inserted"
    NOT_EXECUTABLE = "not executable content"
    UNTRUSTED = "content not in the trust database"
    UNDECIDED = "cannot tell"


@dataclass(frozen=True, slots=True)
class Checked:
    outcome: Outcome
    key: InodeKey | None = None
    kind: FileKind = FileKind.OTHER
    digest: bytes | None = None
    reason: str = ""
    """Why UNDECIDED (a writer holds it open, unkeyable filesystem, changed while read)."""


@dataclass(frozen=True, slots=True)
class Answer:
    allow: bool
    ignore_mask: int = 0
    """fanotify events the handler may stop asking about for this inode (0: keep asking)."""
    denial: str = ""
    """What was denied and why, for the line the confined task and the supervisor print."""


class TrustLookup(Protocol):
    """The read-only part of the trust database the first-seen path needs (a `TrustDB`)."""

    @property
    def generation(self) -> int: ...

    def is_trusted(self, digest: bytes) -> bool: ...

    def digest_cache(self) -> _DigestCache: ...


class _DigestCache(Protocol):
    def lookup(self, key: InodeKey, size: int) -> FileDigests | None: ...


class KeyMap(Protocol):
    """The kernel's trusted-inode map (a `MapKeySink`)."""

    def add(self, keys: list[InodeKey]) -> None: ...

    def remove(self, keys: list[InodeKey]) -> None: ...

    def __contains__(self, key: InodeKey) -> bool: ...


OpenTrust = Callable[[], TrustLookup]
"""Opens the trust database read-only. Called inside the handler process after it forked (an
LMDB environment must not cross a fork). Two optional attributes (trustdb.service.installers,
whose lookup asks the daemon): the opener's `inherited_fds`, fds the handler keeps when it closes
what it inherited; the lookup's `serve_while_waiting(fd, serve)`, how it keeps the handler's
permission group `fd` answered (`serve`) while it waits on the daemon."""


def has_writers(fd: int) -> bool | None:
    """Whether anyone holds the file open for writing (a shared-writable mapping included), so
    its content can change without its ctime moving: a read lease is refused exactly then. The
    opener blocked in a write open counts (its write access is taken before the permission
    event). None when the filesystem has no leases."""
    try:
        fcntl.fcntl(fd, _F_SETLEASE, _F_RDLCK)
    except BlockingIOError:
        return True
    except OSError:
        return None
    fcntl.fcntl(fd, _F_SETLEASE, _F_UNLCK)
    return False


@dataclass
class FirstSeen:
    """Verifies first-seen files through event fds, inserting trusted keys into the map."""

    trust: TrustLookup
    keys: KeyMap
    multigrain: bool = field(default_factory=kernel_has_multigrain)
    inserted: dict[InodeKey, bytes] = field(default_factory=dict)
    """Keys this path inserted, with their digest (removed again when the digest is untrusted)."""
    _untrusted: dict[InodeKey, bytes] = field(default_factory=dict)
    hashed: int = 0

    def check(self, fd: int, *, code: bool = False) -> Checked:
        """`code`: the opener is an interpreter loading this file as code, so its content is
        judged whatever its kind (a `.py` file has no mark of being executable)."""
        st = os.fstat(fd)
        if not statmod.S_ISREG(st.st_mode):
            return Checked(Outcome.NOT_EXECUTABLE)
        key = InodeKey.from_stat(st)
        if key in self.keys:
            return Checked(Outcome.KNOWN, key)
        head = os.pread(fd, 4, 0)
        kind = classify(head, st.st_mode)
        if kind == FileKind.OTHER and not code:
            return Checked(Outcome.NOT_EXECUTABLE, key)
        remembered = self._untrusted.get(key)
        if remembered is not None:
            return Checked(Outcome.UNTRUSTED, key, kind, remembered)
        try:
            magic = fs_magic(fd)
        except OSError as e:
            return Checked(Outcome.UNDECIDED, key, kind, reason=f"statfs: {e.strerror}")
        keys = kernel_keys(f"/proc/self/fd/{fd}", st, magic, mounts=list)
        if isinstance(keys, str):
            return Checked(Outcome.UNDECIDED, key, kind, reason=keys)
        if has_writers(fd):
            return Checked(Outcome.UNDECIDED, key, kind, reason="open for writing")
        if not (self.multigrain and magic in MULTIGRAIN_FS):
            settled = ctime_settled_at(st)
            if settled - coarse_now_ns() > MAX_FIRST_SEEN_WAIT_NS:
                return Checked(Outcome.UNDECIDED, key, kind, reason="modified just now")
            wait_for_coarse_clock(settled)
        digests = self._digests(fd, st, key, executable_only=not code)
        if isinstance(digests, str):
            return Checked(Outcome.UNDECIDED, key, kind, reason=digests)
        digest = digests.blake3
        if not self.trust.is_trusted(digest):
            if len(self._untrusted) >= MAX_REMEMBERED:
                del self._untrusted[next(iter(self._untrusted))]
            self._untrusted[key] = digest
            return Checked(Outcome.UNTRUSTED, key, kind, digest)
        self.keys.add(list(keys))
        for k in keys:
            self.inserted[k] = digest
        return Checked(Outcome.INSERTED, key, kind, digest)

    def _digests(self, fd: int, st: os.stat_result, key: InodeKey, *,
                 executable_only: bool) -> FileDigests | str:
        cached = self.trust.digest_cache().lookup(key, st.st_size)
        if cached is not None:
            return cached
        try:
            hashed = hash_fd(fd, executable_only=executable_only)
        except NotExecutable:
            return "not executable"
        except (HashingError, OSError) as e:
            return str(e)
        self.hashed += 1
        after = hashed.stat
        if (after.st_ino, after.st_ctime_ns, after.st_size) != (
            st.st_ino, st.st_ctime_ns, st.st_size):
            return "changed while being read"
        return hashed.digests

    def forget_untrusted(self) -> list[InodeKey]:
        """After the database changed: drop what we remember, and remove the keys we inserted
        whose digest is no longer trusted (returns them)."""
        self._untrusted.clear()
        gone = [k for k, d in self.inserted.items() if not self.trust.is_trusted(d)]
        if gone:
            self.keys.remove(gone)
            for k in gone:
                del self.inserted[k]
        return gone


# --- interpreters and their scripts -------------------------------------------------------------


def is_script_for(path: str, head: bytes, identity: tuple[int, int],
                  script_files: Collection[tuple[int, int]], *, by_name: bool = True) -> bool:
    """Whether an interpreter opening the file `identity` (st_dev, st_ino), reached as `path`,
    is loading code: it is one of the files its command line or environment names as code
    (`trustdb.script_args`: by identity, so a symlink or /dev/fd/N is the same file), it has a
    `#!` first line, or (`by_name`) it is named like script content (`hashing.is_script_name`)."""
    return (identity in script_files or head.startswith(b"#!")
            or (by_name and is_script_name(path)))


@dataclass(frozen=True, slots=True)
class Interpreters:
    """Which exes are interpreters (by inode key, as the engine was told) and what their
    content digests are."""

    keys: Collection[InodeKey] = ()
    digests: Collection[bytes] = ()
    """A mapping digest -> the interpreter's name (`python3.11`, `mawk`: how its command line
    is read, `trustdb.script_args`) where known; a plain collection otherwise."""
    deny_inline: tuple[str, ...] = ()
    """Interpreter names whose inline code is refused (the policy's deny_inline)."""
    read_sources: tuple[str, ...] = ()
    """Interpreter names judged by command line and `#!` only (the policy's read_sources)."""

    def __bool__(self) -> bool:
        return bool(self.keys or self.digests)

    def name_of(self, digest: bytes | None) -> str:
        names = self.digests
        return names.get(digest, "") if isinstance(names, Mapping) and digest else ""


NO_INTERPRETERS = Interpreters()


# --- the answer ---------------------------------------------------------------------------------


def answer(checked: Checked, *, is_exec: bool, enforce: bool, script_for_interpreter: bool,
           open_mask: int, exec_mask: int, write_open: bool = False,
           writable_mount: bool = False) -> Answer:
    """What to reply to the permission event of a confined task (see the module table).
    `write_open`: the opener asks for write access; `writable_mount`: the file's mount in the
    tree is not read-only, so a later open could write it."""
    both = open_mask | exec_mask
    o = checked.outcome
    if o in (Outcome.KNOWN, Outcome.INSERTED):
        if write_open:
            return Answer(not enforce, 0, "write")
        # Where it can be written, keep seeing its opens (a write open must be refused).
        return Answer(True, exec_mask if writable_mount else both)
    if o == Outcome.NOT_EXECUTABLE:
        return Answer(True, both)
    if o == Outcome.UNTRUSTED:
        if is_exec:
            return Answer(not enforce, 0, "exec")
        if script_for_interpreter:
            return _deny_script(enforce)
        return Answer(True, open_mask)
    if script_for_interpreter:  # undecided (changing while hashed, open for writing): as code,
        return _deny_script(enforce)  # it must be refused: nothing else judges a script load
    return Answer(True, 0)


def _deny_script(enforce: bool) -> Answer:
    return Answer(not enforce, 0, "script")


__all__ = [
    "NO_INTERPRETERS",
    "Answer",
    "Checked",
    "FirstSeen",
    "Interpreters",
    "OpenTrust",
    "Outcome",
    "answer",
    "has_writers",
    "is_script_for",
]
