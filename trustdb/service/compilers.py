"""Trusted compilers and linkers: which processes may make what they write trusted.

Off unless the daemon's policy says `[compilers] trust_outputs = true` (policies/workstation.toml).
A process counts as a compiler only while it runs a compiler *binary*: one of COMPILER_NAMES
(resolved to its real path under a system directory), ELF, and with its inode key in the
kernel's trusted map (its content is trusted: a renamed copy of python is not a compiler, and an
interpreter never is one, whatever it is called).

Why exec events and not /proc/PID/exe at close time: `ld` closes its output and exits at once,
and `cc` reaps it before `cc -o x x.c && ./x` execs x; by the time the daemon reads the
close-write event the writer is gone. So each compiler binary gets an inode mark for FAN_OPEN_EXEC
in the same notification group as the close-write marks: the exec event of pid P is queued
before any close-write of P (one queue, in order), and P is remembered as that compiler.

Residual (README, "Compiler outputs"): a remembered pid that has exited is forgotten after the
next pump; a close-write read in that window from a *reused* pid (a process forked through the
whole pid space in between) would be taken for the compiler's. A live pid must still run the
same compiler inode.
"""

from __future__ import annotations

import glob
import os
from collections.abc import Callable
from dataclasses import dataclass

from trustdb.fanotify import FanotifyError
from trustdb.model import InodeKey
from trustdb.service.hostns import host_writer_file

FAN_OPEN_EXEC = 0x00001000

COMPILER_NAMES: frozenset[str] = frozenset({
    "cc", "c++", "gcc", "g++", "clang", "clang++", "collect2",
    "ld", "ld.bfd", "ld.gold", "ld.lld", "lld", "mold",
    "go", "link", "rustc",
})
"""Basenames (after resolving links, a versioned or target-prefixed name counts too:
x86_64-linux-gnu-ld.bfd, gcc-12, clang-16). `as` is left out: it writes objects, not programs."""

SEARCH_DIRS = ("/usr/bin", "/usr/local/bin")
EXTRA_GLOBS = (
    "/usr/lib/gcc/*/*/collect2",
    "/usr/lib/go*/pkg/tool/*/link",
    "/usr/lib/go-*/pkg/tool/*/link",
    "/usr/local/go/pkg/tool/*/link",
)
TRUSTED_PREFIXES = ("/usr/bin/", "/usr/lib/", "/usr/libexec/", "/usr/local/bin/",
                    "/usr/local/go/")
"""Where a compiler's real path must live (root-owned system trees)."""


def program_name(real_path: str) -> str | None:
    """The compiler a real path is, or None: `x86_64-linux-gnu-gcc-12` is gcc."""
    base = os.path.basename(real_path)
    if base in COMPILER_NAMES:
        return base
    stem = base
    for arch in ("x86_64-linux-gnu-", "aarch64-linux-gnu-", "i686-linux-gnu-"):
        stem = stem.removeprefix(arch)
    head, _, tail = stem.rpartition("-")
    if head and tail.replace(".", "").isdigit():
        stem = head  # gcc-12, clang-16
    return stem if stem in COMPILER_NAMES else None


def candidate_paths() -> list[str]:
    """Real paths of the compiler binaries on this machine."""
    out: set[str] = set()
    names = [os.path.join(d, n) for d in SEARCH_DIRS for n in COMPILER_NAMES]
    names += [p for g in EXTRA_GLOBS for p in glob.glob(g)]
    for p in names:
        real = os.path.realpath(p)
        if os.path.isfile(real) and real.startswith(TRUSTED_PREFIXES) and program_name(real):
            out.add(real)
    return sorted(out)


def _is_elf(fd: int) -> bool:
    try:
        return os.pread(fd, 4, 0) == b"\x7fELF"
    except OSError:
        return False


@dataclass(frozen=True, slots=True)
class Compiler:
    path: str
    name: str
    key: InodeKey


class CompilerWatch:
    """The compiler binaries (inode-marked for FAN_OPEN_EXEC) and the pids running them."""

    def __init__(self, mark_inode_fd: Callable[[int, int], None],
                 is_trusted_key: Callable[[InodeKey], bool],
                 paths: Callable[[], list[str]] = candidate_paths,
                 name_of: Callable[[str], str | None] = program_name) -> None:
        """`paths` and `name_of`: which binaries, and what each is called (the trusted
        installers use the same watch with their own list)."""
        self._mark = mark_inode_fd
        self._trusted = is_trusted_key
        self._paths = paths
        self._name_of = name_of
        self.compilers: dict[InodeKey, Compiler] = {}
        self._running: dict[int, Compiler] = {}

    def refresh(self) -> list[Compiler]:
        """Mark the compiler binaries whose content the kernel trusts (again after an upgrade:
        a new inode). Returns the ones newly marked."""
        added = []
        for path in self._paths():
            try:
                fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
            except OSError:
                continue
            try:
                key = InodeKey.from_stat(os.fstat(fd))
                if key in self.compilers or not _is_elf(fd) or not self._trusted(key):
                    continue
                name = self._name_of(path)
                if name is None:
                    continue
                self._mark(fd, FAN_OPEN_EXEC)
                self.compilers[key] = Compiler(path, name, key)
                added.append(self.compilers[key])
            except (OSError, FanotifyError):
                continue  # unreadable, or a filesystem fanotify cannot mark: not a writer
            finally:
                os.close(fd)
        return added

    def on_exec(self, fd: int, pid: int) -> Compiler | None:
        """An exec event: `pid` now runs the binary behind `fd` (a marked compiler, or else).
        -> the trusted compiler it now runs, if any (exec'd from the host's own namespaces)."""
        try:
            key = InodeKey.from_stat(os.fstat(fd))
        except OSError:
            return None
        compiler = self.compilers.get(key)
        if compiler is not None and self._trusted(key) and host_writer_file(fd, pid):
            self._running[pid] = compiler
            return compiler
        self._running.pop(pid, None)
        return None

    def writer(self, pid: int) -> Compiler | None:
        """The compiler that `pid` runs, if it is one (see the module's residual)."""
        compiler = self._running.get(pid)
        if compiler is None:
            return None
        try:
            st = os.stat(f"/proc/{pid}/exe")
        except OSError:
            return compiler  # exited (ld, right after its close): its exec event vouches
        if InodeKey.from_stat(st) != compiler.key:
            self._running.pop(pid, None)  # it exec'd something else, or the pid was reused
            return None
        return compiler

    def exited(self) -> set[int]:
        """Remembered pids already gone: call before draining the queue, then `forget` them
        after (every event of theirs was queued before they exited)."""
        return {p for p in self._running if not os.path.exists(f"/proc/{p}")}

    def forget(self, pids: set[int]) -> None:
        for pid in pids:
            self._running.pop(pid, None)
