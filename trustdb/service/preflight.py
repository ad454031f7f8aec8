"""Safe to switch on: what enforcing would deny that the machine, or trustdb itself, needs.

`trustdb daemon --mode enforce` refuses to start (one line, nothing attached) when the database
is missing or empty, or when any file below is not trusted by content; `trustdb service
preflight` lists them, each with the command that trusts it. What is needed:
- the service itself: its interpreter and every executable file mapped into this process
  (/proc/self/maps: libpython, libc, the venv's C extensions: lmdb, blake3, libbpf...);
- the package-manager hooks' commands (the trustdb entry point and its `#!` interpreter);
- what boot, login and administration exec (BOOT_AND_LOGIN), with the ELF interpreter and the
  shared libraries each one needs (DT_NEEDED, resolved in the system library directories).
Only files that exist are required: a machine without sudo does not need sudo trusted.
"""

from __future__ import annotations

import os
import shutil
import struct
import sys
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

from trustdb.db import TrustDB
from trustdb.dbrecords import DatabaseError
from trustdb.hashing import HashingError, hash_file

BOOT_AND_LOGIN: tuple[tuple[str, str], ...] = (
    ("/bin/sh", "boot scripts, maintainer scripts, system()"),
    ("/bin/bash", "login shells"),
    ("/bin/login", "console login"),
    ("/sbin/agetty", "console login"),
    ("/usr/sbin/sshd", "remote login"),
    ("/usr/bin/sudo", "administration"),
    ("/bin/su", "administration"),
    ("/usr/bin/env", "#! lines"),
    ("/bin/systemctl", "service management"),
    ("/lib/systemd/systemd", "PID 1 (daemon-reexec after an upgrade)"),
    ("/lib/systemd/systemd-executor", "starts every service (systemd 255+)"),
    ("/lib/systemd/systemd-journald", "logging"),
    ("/lib/systemd/systemd-logind", "logins"),
    ("/lib/systemd/systemd-udevd", "devices"),
    ("/lib/systemd/systemd-sulogin-shell", "rescue shell"),
    ("/sbin/sulogin", "rescue shell"),
    ("/usr/bin/dpkg", "package installs"),
    ("/usr/bin/apt-get", "package installs"),
    ("/usr/bin/apt", "package installs"),
    ("/usr/lib/apt/methods/http", "package downloads"),
    ("/usr/bin/rpm", "package installs"),
    ("/usr/bin/dnf", "package installs"),
)
"""(path, why): what a machine needs to boot, let people log in and be repaired."""

_PT_LOAD, _PT_DYNAMIC, _PT_INTERP = 1, 2, 3
_DT_NEEDED, _DT_STRTAB = 1, 5

LIBRARY_DIRS = ("/lib/x86_64-linux-gnu", "/usr/lib/x86_64-linux-gnu", "/lib64", "/usr/lib64",
                "/lib", "/usr/lib")


@dataclass(frozen=True, slots=True)
class Needed:
    path: str
    why: str


@dataclass(frozen=True, slots=True)
class Finding:
    """A needed file the database does not trust (or that could not be read)."""

    path: str
    why: str
    problem: str = "not trusted"

    def line(self, db: Path | None = None) -> str:
        opt = f" --db {db}" if db is not None else ""
        return f"{self.path}: {self.problem} (needed for {self.why}); trustdb trust{opt} {self.path}"


def service_files(maps: str = "/proc/self/maps") -> Iterator[Needed]:
    """The interpreter and every file mapped executable into this process."""
    yield Needed(os.path.realpath(sys.executable), "the trustdb service's interpreter")
    seen: set[str] = set()
    with open(maps) as f:
        for line in f:
            parts = line.split(maxsplit=5)
            if len(parts) < 6 or "x" not in parts[1] or not parts[5].startswith("/"):
                continue
            path = parts[5].strip()
            if path.endswith(" (deleted)") or path in seen:
                continue
            seen.add(path)
            yield Needed(path, "the trustdb service (mapped into it)")


def hook_files() -> Iterator[Needed]:
    """What the dpkg/apt and rpm hooks run: the trustdb command and its #! interpreter."""
    entry = shutil.which("trustdb") or "/usr/bin/trustdb"
    if not os.path.exists(entry):
        return
    real = os.path.realpath(entry)
    yield Needed(real, "the package-manager hooks (trustdb import)")
    interp = shebang(real)
    if interp:
        yield Needed(os.path.realpath(interp), "the package-manager hooks (interpreter)")


def shebang(path: str) -> str | None:
    try:
        with open(path, "rb") as f:
            head = f.read(256)
    except OSError:
        return None
    if not head.startswith(b"#!"):
        return None
    words = head[2:].split(b"\n", 1)[0].split()
    return os.fsdecode(words[0]) if words else None


def boot_files() -> Iterator[Needed]:
    for path, why in BOOT_AND_LOGIN:
        if os.path.exists(path):
            yield Needed(os.path.realpath(path), why)


def with_libraries(needed: Iterable[Needed]) -> Iterator[Needed]:
    """Each file, then (for ELF files) its PT_INTERP and DT_NEEDED libraries, transitively."""
    done: set[str] = set()
    queue = list(needed)
    while queue:
        n = queue.pop(0)
        if n.path in done:
            continue
        done.add(n.path)
        yield n
        for lib in elf_dependencies(n.path):
            if lib not in done:
                root_why = n.why.split(" (library of ")[0]
                queue.append(Needed(lib, f"{root_why} (library of {os.path.basename(n.path)})"))


def elf_dependencies(path: str) -> list[str]:
    """PT_INTERP and the DT_NEEDED libraries of an ELF64 little-endian file, resolved in the
    system library directories (what the dynamic loader maps first). Read with struct, not a
    full ELF library: the preflight runs at every enforcing start, and under emulation a
    pure-Python ELF parser took most of it."""
    try:
        with open(path, "rb") as f:
            data = f.read(1 << 22)
    except OSError:
        return []
    if len(data) < 64 or data[:4] != b"\x7fELF" or data[4] != 2 or data[5] != 1:
        return []
    phoff, = struct.unpack_from("<Q", data, 32)
    phentsize, phnum = struct.unpack_from("<HH", data, 54)
    out: list[str] = []
    loads: list[tuple[int, int, int]] = []
    dynamic: tuple[int, int] | None = None
    for i in range(phnum):
        off = phoff + i * phentsize
        if off + 56 > len(data):
            return out
        p_type, _flags, p_offset, p_vaddr, _paddr, p_filesz = struct.unpack_from(
            "<IIQQQQ", data, off)
        if p_type == _PT_INTERP:
            out.append(os.path.realpath(data[p_offset:p_offset + p_filesz].split(b"\0")[0]
                                        .decode(errors="replace")))
        elif p_type == _PT_LOAD:
            loads.append((p_vaddr, p_offset, p_filesz))
        elif p_type == _PT_DYNAMIC:
            dynamic = (p_offset, p_filesz)
    if dynamic is None:
        return out
    needed: list[int] = []
    strtab = 0
    for off in range(dynamic[0], min(dynamic[0] + dynamic[1], len(data) - 15), 16):
        tag, val = struct.unpack_from("<qQ", data, off)
        if tag == 0:
            break
        if tag == _DT_NEEDED:
            needed.append(val)
        elif tag == _DT_STRTAB:
            strtab = val
    base = next((o + strtab - v for v, o, n in loads if v <= strtab < v + n), None)
    if base is None:
        return out
    for name_off in needed:
        raw = data[base + name_off:base + name_off + 256].split(b"\0")[0]
        found = _find_library(raw.decode(errors="replace"))
        if found:
            out.append(found)
    return out


def _find_library(name: str) -> str | None:
    for d in LIBRARY_DIRS:
        p = os.path.join(d, name)
        if os.path.exists(p):
            return os.path.realpath(p)
    return None


def required(*, include_service: bool = True) -> list[Needed]:
    sources: list[Needed] = []
    if include_service:
        sources += list(service_files())
    sources += list(hook_files()) + list(boot_files())
    return list(with_libraries(sources))


def check(db_path: Path, needed: Iterable[Needed] | None = None) -> tuple[str | None, list[Finding]]:
    """(why the database itself is unusable or None, needed files it does not trust)."""
    try:
        db = TrustDB.open(db_path)
    except DatabaseError as e:
        return f"no usable trust database: {e}", []
    try:
        if db.status().contents == 0:
            return f"the trust database {db_path} is empty (trustdb import deb, or rpm)", []
        findings = []
        for n in needed if needed is not None else required():
            try:
                digest = hash_file(n.path).digests.blake3
            except (HashingError, OSError) as e:
                findings.append(Finding(n.path, n.why, f"unreadable ({e})"))
                continue
            if not db.is_trusted(digest):
                findings.append(Finding(n.path, n.why))
        return None, findings
    finally:
        db.close()


def refusal(db_path: Path) -> str | None:
    """One line if enforcing now would lock the machine or trustdb out; None if it is safe."""
    problem, findings = check(db_path)
    if problem:
        return f"refusing to enforce: {problem}"
    if findings:
        first = findings[0]
        return (f"refusing to enforce: {len(findings)} file(s) the machine or trustdb needs are "
                f"not trusted (first: {first.path}, needed for {first.why}); "
                "`trustdb service preflight` lists them")
    return None
