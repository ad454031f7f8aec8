"""Explain a verdict: why is this file's content trusted or not (`trustdb check`, `trustdb why`).

The kernel decides by content alone; this is the same rule, worded for a person. The database
only stores facts; this one function reads them and says what they mean for one file.
"""

from __future__ import annotations

import os
import time
from collections.abc import Iterator
from dataclasses import dataclass

from trustdb.db import TrustDB
from trustdb.dbrecords import PathRecord
from trustdb.hashing import HashingError, NotExecutable, hash_many
from trustdb.model import InodeKey, SkippedEntry
from trustdb.walk import walk

TRUSTED = "trusted"
"""The content is in the database (any source, any path: trust is by content)."""
CHANGED = "changed"
"""The path was trusted, but with other content: the file changed since."""
NEVER_TRUSTED = "never-trusted"
"""Neither this content nor this path is known."""
UNREADABLE = "unreadable"
"""The file could not be hashed (vanished, permission, not a regular file...)."""


@dataclass(frozen=True, slots=True)
class Verdict:
    path: str
    trusted: bool
    reason: str
    """One of TRUSTED, CHANGED, NEVER_TRUSTED, UNREADABLE."""
    detail: str
    """One line for a person: which sources, since when, or what went wrong."""
    digest: bytes | None = None
    vouchers: tuple[PathRecord, ...] = ()
    """For TRUSTED: every (source, path) that vouches for the content."""
    previous: tuple[PathRecord, ...] = ()
    """For CHANGED: what was trusted at this path before."""


def _when(t: float) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(t))


def explain(db: TrustDB, path: str, digest: bytes) -> Verdict:
    """The verdict for content `digest` found at `path`."""
    vouchers = db.trusted_by(digest)
    if vouchers:
        labels = sorted({r.label for r in vouchers})
        here = [r for r in vouchers if r.path == path]
        where = "" if here else f" (as {vouchers[0].path})"
        return Verdict(
            path, True, TRUSTED, f"trusted by {', '.join(labels)}{where}", digest, tuple(vouchers)
        )
    previous = db.records_for_path(path)
    if previous:
        latest = max(previous, key=lambda r: r.trusted_at)
        return Verdict(
            path,
            False,
            CHANGED,
            f"content changed since trusted at {_when(latest.trusted_at)} by {latest.label}",
            digest,
            previous=tuple(previous),
        )
    return Verdict(path, False, NEVER_TRUSTED, "never trusted", digest)


def unreadable(path: str, reason: str) -> Verdict:
    """The verdict for a file that could not be hashed."""
    return Verdict(path, False, UNREADABLE, reason)


def check_paths(db: TrustDB, paths: list[str], *, all_files: bool = False) -> Iterator[Verdict]:
    """A verdict for every file named, and for every executable file (every file with
    all_files) under every directory named. Files are hashed in parallel, each read once."""
    for arg in paths:
        is_dir = os.path.isdir(arg)
        found = list(walk([arg]))
        names = [f for f in found if isinstance(f, str)]
        for item in found:
            if isinstance(item, SkippedEntry) and item.fatal:
                yield unreadable(item.path, item.reason)
        results = hash_many(names, follow_symlinks=True, executable_only=is_dir and not all_files)
        for path, result in results:
            if isinstance(result, NotExecutable):
                continue
            if isinstance(result, HashingError):
                yield unreadable(path, str(result))
            else:
                yield explain(db, path, result.digests.blake3)


@dataclass(frozen=True, slots=True)
class VerifyProblem:
    """A recorded (source, path) fact that no longer holds on disk."""

    record: PathRecord
    reason: str
    """`missing`, `changed` or `unreadable: <why>`."""


def verify(db: TrustDB, label: str | None = None) -> tuple[int, list[VerifyProblem]]:
    """Re-hash every recorded path (of one source) -> (paths checked, problems)."""
    by_path: dict[str, list[PathRecord]] = {}
    for record in db.iter_paths(label):
        by_path.setdefault(record.path, []).append(record)
    problems: list[VerifyProblem] = []
    for path, result in hash_many(list(by_path), follow_symlinks=True):
        records = by_path[path]
        if isinstance(result, HashingError):
            missing = not os.path.lexists(path)
            reason = "missing" if missing else f"unreadable: {result}"
            problems.extend(VerifyProblem(r, reason) for r in records)
        else:
            problems.extend(
                VerifyProblem(r, "changed") for r in records if r.digest != result.digests.blake3
            )
    return len(by_path), problems


# ---- `trustdb why PATH|PID|event:N`: a denial explained, with the way out --------------------


@dataclass(frozen=True, slots=True)
class Nearest:
    """Trusted content close to an untrusted file: what a person probably meant to trust."""

    relation: str
    """`same path` (another content trusted at this path, by any source), `same package`
    (the file's package at another version), or `same name` (a file of this name elsewhere)."""
    record: PathRecord


@dataclass(frozen=True, slots=True)
class Explanation:
    """Everything `why` says about one file."""

    path: str
    key: InodeKey | None
    """The inode key the kernel computes for this file now (dev, ino, ctime); None if gone."""
    verdict: Verdict
    nearest: tuple[Nearest, ...] = ()
    fix: str = ""
    """The exact command that would allow this content (empty when it is trusted)."""
    note: str = ""
    """Anything else a person must know (the denied inode is not the file at the path now)."""


NEAREST_LIMIT = 5


def explain_path(db: TrustDB, path: str, *, denied_key: tuple[int, int] | None = None) -> Explanation:
    """Why the content at `path` is or is not trusted. `denied_key` (dev, ino) is the inode a
    logged decision named: when the file at the path is another inode now, the note says so."""
    real = os.path.realpath(path)
    try:
        st = os.stat(real)
        key: InodeKey | None = InodeKey.from_stat(st)
    except OSError as e:
        return Explanation(real, None, unreadable(real, e.strerror or str(e)),
                           note="the file is gone or unreadable now")
    (verdict,) = check_paths(db, [real], all_files=True)
    note = ""
    if denied_key is not None and key is not None and denied_key != (key.dev, key.ino):
        note = (f"the denied inode {denied_key[0]}:{denied_key[1]} is not the file at this path "
                f"now ({key.dev}:{key.ino}): it was replaced since the decision")
    if verdict.trusted:
        return Explanation(real, key, verdict, note=note)
    nearest = tuple(find_nearest(db, real, verdict))
    return Explanation(real, key, verdict, nearest, fix_command(real, verdict, nearest), note)


def find_nearest(db: TrustDB, path: str, verdict: Verdict) -> Iterator[Nearest]:
    """The same path in any source (other content), the same package at another version,
    the same file name elsewhere: at most NEAREST_LIMIT of each, one scan of the paths."""
    name = os.path.basename(path)
    packages = {_package_of(r.origin) for r in verdict.previous if r.origin}
    same_path = list(verdict.previous)[:NEAREST_LIMIT]
    same_package: list[PathRecord] = []
    same_name: list[PathRecord] = []
    for r in db.iter_paths():
        if r.path == path:
            if r not in same_path and len(same_path) < NEAREST_LIMIT:
                same_path.append(r)
            continue
        if os.path.basename(r.path) != name:
            continue
        if packages and r.origin and _package_of(r.origin) in packages:
            if len(same_package) < NEAREST_LIMIT:
                same_package.append(r)
        elif len(same_name) < NEAREST_LIMIT:
            same_name.append(r)
    yield from (Nearest("same path", r) for r in same_path)
    yield from (Nearest("same package", r) for r in same_package)
    yield from (Nearest("same name", r) for r in same_name)


def _package_of(origin: str) -> str:
    """`bash_5.2.15-2+b7_amd64` (dpkg) -> `bash`; `rich==13.3` (python) -> `rich`;
    `bash-5.2.26-3.fc40.x86_64` (rpm) -> `bash`."""
    for sep in ("==", "_"):
        if sep in origin:
            return origin.split(sep, 1)[0]
    parts = origin.rsplit("-", 2)
    return parts[0] if len(parts) == 3 else origin


def fix_command(path: str, verdict: Verdict, nearest: tuple[Nearest, ...]) -> str:
    """The one command that makes this content trusted (quoted for a shell)."""
    import shlex

    if verdict.reason == UNREADABLE:
        return ""
    for n in nearest:
        if n.relation == "same path" and n.record.label.startswith("dir:"):
            # A rebuilt file of a trusted build directory: re-trust the directory (one source).
            return f"trustdb trust {shlex.quote(n.record.label[4:])}"
    return f"trustdb trust {shlex.quote(path)}"


def executable_files_of(pid: int) -> list[str]:
    """The files a process runs: its executable, then every file mapped executable (ld.so,
    shared libraries), from /proc/PID/maps; in first-mapped order, each once."""
    files = [os.readlink(f"/proc/{pid}/exe").removesuffix(" (deleted)")]
    with open(f"/proc/{pid}/maps", encoding="utf-8", errors="surrogateescape") as maps:
        for line in maps:
            fields = line.split(maxsplit=5)
            if len(fields) == 6 and "x" in fields[1] and fields[5].startswith("/"):
                mapped = fields[5].rstrip("\n").removesuffix(" (deleted)")
                if mapped not in files:
                    files.append(mapped)
    return files
