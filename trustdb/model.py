"""The values that flow through trustdb's pipeline.

importers -> TrustEntry -> db -> mirror (InodeKey) -> BPF programs -> events (Decision)

Everything here is a frozen dataclass: stages hand values to the next stage, never shared state.
"""

from __future__ import annotations

import enum
import os
from dataclasses import dataclass, field
from typing import NamedTuple


class FileKind(enum.IntEnum):
    """What kind of executable content a file holds (stored as one byte in the database)."""

    OTHER = 0
    """A regular file with no sign of being executable (only recorded with --all-files)."""
    ELF = 1
    """An ELF object: executable, shared library or ld.so itself, whatever its mode bits."""
    SCRIPT = 2
    """Starts with `#!`: run through its interpreter."""
    EXECUTABLE = 3
    """Has an exec bit but is neither ELF nor `#!` (e.g. a binfmt_misc format)."""
    SCRIPT_SOURCE = 4
    """Script content by name (`.py`, `.pyc`, `.pl`, `.sh`, ...: `hashing.SCRIPT_EXTENSIONS`)
    without `#!` or an exec bit: what an interpreter loads (a stdlib module), recorded by default
    so that interpreters can be judged by the content of what they load (issue 10)."""


class InodeKey(NamedTuple):
    """The identity of one version of one inode, as the kernel's hooks see it.

    Any change to the file (content, chmod, rename, link, utime, xattr) changes ctime, so a key
    stops matching as soon as the file is touched. `dev` is the *kernel* encoding
    (major << 20 | minor), which differs from `os.stat().st_dev`; use `from_stat`.
    `ctime_nsec` never carries the multigrain flag bit (bit 31 on 6.13+), the BPF side masks it.
    A NamedTuple, not a dataclass: the mirror hashes and compares keys several times per path,
    and a tuple does that in C (a frozen dataclass's __hash__ is Python code; profiled).
    """

    dev: int
    ino: int
    ctime_sec: int
    ctime_nsec: int

    @classmethod
    def from_stat(cls, st: os.stat_result) -> InodeKey:
        kdev = (os.major(st.st_dev) << 20) | os.minor(st.st_dev)
        ctime_sec, ctime_nsec = divmod(st.st_ctime_ns, 1_000_000_000)
        return cls(kdev, st.st_ino, ctime_sec, ctime_nsec)


@dataclass(frozen=True, slots=True)
class FileDigests:
    """What one read of a file produced."""

    blake3: bytes
    """BLAKE3-256 of the content (32 bytes): the identity trustdb trusts."""
    size: int
    kind: FileKind
    sha256: bytes | None = None
    """Only computed when a source needs it to verify against a package digest."""
    md5: bytes | None = None
    """Only computed for dpkg, whose md5sums files carry nothing stronger."""


@dataclass(frozen=True, slots=True)
class TrustEntry:
    """One trusted file: "content D, found at PATH, vouched for by ORIGIN"."""

    path: str
    """Absolute path where the content lives (or would live, for a package file not installed)."""
    digest: bytes
    """BLAKE3-256 of the content, 32 bytes."""
    size: int
    kind: FileKind
    sha256: bytes | None = None
    origin: str = ""
    """Provenance inside the source: `bash-5.2.15-2+b7.amd64`, `requests==2.32.3`, or ''."""
    inode: InodeKey | None = None
    """Identity of the on-disk file that was hashed, when one was; lets the database cache the
    verification so that the next import or mirror does not re-read an unchanged file."""
    md5: bytes | None = None
    """MD5 of the content, set only by the deb importer (dpkg records nothing stronger), so the
    database's verification cache can answer `want_md5` and a re-import reads nothing again."""


@dataclass(frozen=True, slots=True)
class SkippedEntry:
    """A file a source names but that could not be trusted; reported, never recorded."""

    path: str
    reason: str
    """One line a user can act on: `digest mismatch (tampered or locally modified)`, ..."""
    origin: str = ""
    fatal: bool = False
    """True when the skip should make the command exit non-zero (unreadable, vanished,
    mismatched); False for benign skips (FIFO, socket, documentation)."""
    seen: InodeKey | None = None
    """The file's inode key when it was judged (`ABSENT`: it did not exist), for a verdict
    that holds while the key does (a mismatch, a missing file): an unchanged re-import
    repeats it without reading the file. None: judge again next time (a read error)."""


ABSENT = InodeKey(0, 0, 0, 0)
"""`SkippedEntry.seen` of a file that did not exist (no inode has number 0 on device 0)."""


@dataclass(frozen=True, slots=True)
class PartDone:
    """In a source's stream, after the items of one part (a package): what the database keeps
    so that the next import can skip the part when nothing about it changed (SCHEMA: P)."""

    name: str
    """The part's name inside the source (the package's origin)."""
    fingerprint: bytes | None
    """A digest of everything the importer read to list the part's claims (its package
    database records and their stat keys); None: the part may not be skipped next time."""
    files: int
    not_executable: int


@dataclass(frozen=True, slots=True)
class KeptPart:
    """In a source's stream, in place of a part's items: the part is exactly as recorded
    (same fingerprint, every recorded file still has its inode key), keep its entries."""

    name: str


@dataclass(frozen=True, slots=True)
class PartState:
    """One part (package) as the last import left it (see `trustdb.dbview.DigestCacheView.previous_part`)."""

    fingerprint: bytes
    files: int
    not_executable: int
    recorded: list[tuple[bytes, int, InodeKey]]
    """(raw path, size, inode key) of each entry the part recorded."""
    skipped: list[SkippedEntry] = field(default_factory=list)
    """The part's remembered skips (each with its `seen` key), repeated when it is kept."""


StreamItem = TrustEntry | SkippedEntry | PartDone | KeptPart
"""What a source write consumes."""
