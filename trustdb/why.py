"""Explain a verdict: why is this file's content trusted or not (`trustdb check`).

The kernel decides by content alone; this is the same rule, worded for a person. The database
only stores facts; this one function reads them and says what they mean for one file.
"""

from __future__ import annotations

import os
import time
from collections.abc import Iterator
from dataclasses import dataclass

from trustdb.db import PathRecord, TrustDB
from trustdb.hashing import HashingError, NotExecutable, hash_many
from trustdb.model import SkippedEntry
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
