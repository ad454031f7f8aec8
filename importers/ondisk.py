"""Verify installed files against their package's digests (shared by the deb, rpm and python
importers).

A package manager's database says "PATH should hold content with digest D". This module checks
that claim on disk and turns it into a `TrustEntry` (the content matches) or a `SkippedEntry`
(it does not, or cannot be checked). Three rules keep a whole-system import fast:

- Only executable content is read in full: ELF objects, `#!` scripts and files with an exec bit
  (what the kernel can execute or map executable), and script sources by name (`.py`, `.pl`,
  `.sh`, ...: FileKind.SCRIPT_SOURCE, what a trusted interpreter loads). Everything else costs
  one `lstat` and a 4-byte read, and is counted as `not_executable`. `all_files=True` verifies and records every file.
- A file whose inode identity (dev, ino, ctime) and size are in the database's digest cache is not
  read at all: ctime moves on any change, so an unchanged key means unchanged content.
- Each file is read once, for BLAKE3 and the package's digest together (`hash_file`); packages are
  verified on a small thread pool, since blake3 and hashlib release the GIL on large reads.
"""

from __future__ import annotations

import os
import stat as statmod
import threading
import time
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field

from trustdb_importers.interface import DigestCache, Importer

from trustdb.hashing import HashingError, classify, hash_file, is_script_name, with_name
from trustdb.mapped import mapping_allowed
from trustdb.model import (
    ABSENT,
    FileDigests,
    FileKind,
    InodeKey,
    KeptPart,
    PartDone,
    PartState,
    SkippedEntry,
    StreamItem,
    TrustEntry,
)

MAX_SYMLINKS = 40
"""Symlinks followed while resolving one path inside a root (the kernel's limit)."""

FRESH_SECONDS = 0.1
"""A file whose ctime is this close to the moment it was hashed is not offered for caching
(its entry carries no inode): a write in the same ctime tick, just after the read, would keep
the inode key while changing the content. Entries reach the database a little after they were
hashed, so the database's own check (on arrival time) cannot see this on its own."""

WORKERS = max(2, min(8, (os.cpu_count() or 2) * 2))
"""Hashing threads: twice the cores, since part of each read waits on the disk."""

# Skip reasons, shared so that every importer says the same thing for the same problem.
MISMATCH = "digest mismatch (tampered or locally modified): not trusted"
CONFIG_CHANGED = "config file changed locally: not trusted (`trustdb trust` it if intended)"
SIZE_MISMATCH = "size differs from the package's record (tampered or locally modified): not trusted"
UNVERIFIABLE = "unverifiable: the package records no digest for it: not trusted"
MISSING = "missing on disk (not installed, or removed since)"
NOT_REGULAR = "not a regular file on disk (the package ships one): not trusted"

ProgressFn = Callable[[int, int], None]
"""Called with (packages done, packages total) after each package."""


@dataclass(frozen=True, slots=True)
class FileClaim:
    """One file a package says it installed, with the digest it should have."""

    relpath: str
    """Path inside the root, as the package database names it (`usr/bin/bash`)."""
    algo: str | None
    """`md5` or `sha256`: the digest the package records; None when it records none."""
    expected: bytes | None
    size: int | None = None
    """Expected size when the package records one (rpm, RECORD), else None."""
    optional: bool = False
    """The package manager was told not to install it (dpkg's path-exclude): its absence is
    expected and not reported; if it is there, it is verified like any other file."""
    config: bool = False
    """A configuration file the admin is expected to edit (dpkg conffile, rpm %config): a
    mismatch is reported and not trusted, but is not a failure."""


@dataclass(frozen=True, slots=True)
class PackageClaims:
    """Every file one package claims, plus skips the importer already found reading its records."""

    origin: str
    claims: tuple[FileClaim, ...]
    skipped: tuple[SkippedEntry, ...] = ()


@dataclass(slots=True)
class ImportStats:
    """Counters an importer fills while its collect() stream is consumed (for the summary)."""

    packages: int = 0
    files: int = 0
    """Files the package databases name (regular files only, where the database tells)."""
    recorded: int = 0
    not_executable: int = 0
    """Regular files left out because nothing can execute them (see `all_files`)."""
    skipped: int = 0
    fatal: int = 0
    bytes_hashed: int = 0
    bytes_recorded: int = 0
    cache_hits: int = 0
    packages_kept: int = 0
    """Packages found exactly as the last import recorded them (not read again)."""


@dataclass(frozen=True, slots=True)
class _Outcome:
    item: TrustEntry | SkippedEntry | None
    hashed: int = 0
    cached: bool = False
    counted: bool = True
    """False for a path that turned out not to be a file (a directory a package lists)."""


_NOT_A_FILE = _Outcome(None, counted=False)


@dataclass(slots=True)
class Root:
    """A filesystem tree that package paths are relative to, resolved without escaping it.

    For `/` paths are used as they are. For any other root, symlinks are resolved by hand so an
    absolute link inside an image (`lib64 -> /usr/lib64`) points into the image, not the host.
    """

    path: str
    _dirs: dict[str, str] = field(default_factory=dict)
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def __post_init__(self) -> None:
        self.path = os.path.abspath(self.path)

    def host_path(self, relpath: str) -> str:
        """The path a user sees (root joined with the package path), used in entries."""
        rel = relpath.lstrip("/")
        return "/" + rel if self.path == "/" else os.path.join(self.path, rel)

    def resolve(self, relpath: str) -> str:
        """Host path of relpath's parent resolved inside the root, plus its last component."""
        if self.path == "/":
            return "/" + relpath.lstrip("/")
        parent, _, base = relpath.strip("/").rpartition("/")
        return os.path.join(self._resolve_dir(parent, 0), base)

    def _resolve_dir(self, rel: str, depth: int) -> str:
        with self._lock:
            hit = self._dirs.get(rel)
        if hit is not None:
            return hit
        current = self.path
        for part in rel.split("/"):
            if part in ("", "."):
                continue
            if part == "..":
                # Never above the root, like chroot.
                current = os.path.dirname(current) if current != self.path else current
                continue
            candidate = os.path.join(current, part)
            try:
                target = os.readlink(candidate)
            except OSError:
                current = candidate  # not a symlink (or missing: the open will say so)
                continue
            if depth >= MAX_SYMLINKS:
                raise HashingError("too many levels of symbolic links")
            base = "" if target.startswith("/") else os.path.relpath(current, self.path)
            current = self._resolve_dir(_inside(os.path.join(base, target.lstrip("/"))), depth + 1)
        with self._lock:
            self._dirs[rel] = current
        return current


def _inside(rel: str) -> str:
    """Normalize a root-relative path, clamping `..` at the root (chroot semantics)."""
    parts: list[str] = []
    for part in rel.split("/"):
        if part == "..":
            if parts:
                parts.pop()
        elif part not in ("", "."):
            parts.append(part)
    return "/".join(parts)


class LockedCache:
    """Serializes lookups: a database cache view is not promised to be thread-safe."""

    def __init__(self, cache: DigestCache) -> None:
        self._cache = cache
        self._lock = threading.Lock()

    def lookup(
        self, key: InodeKey, size: int, *, want_sha256: bool = False, want_md5: bool = False
    ) -> FileDigests | None:
        with self._lock:
            return self._cache.lookup(key, size, want_sha256=want_sha256, want_md5=want_md5)

    def previous_part(self, label: str, name: str) -> PartState | None:
        """The database's record of a package (None from a cache that keeps none)."""
        previous = getattr(self._cache, "previous_part", None)
        if previous is None:
            return None
        with self._lock:
            return previous(label, name)  # type: ignore[no-any-return]


def _head(path: str) -> bytes:
    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC | os.O_NOFOLLOW | os.O_NOCTTY)
    try:
        return os.pread(fd, 4, 0)
    finally:
        os.close(fd)


def _matches(digests: FileDigests, claim: FileClaim) -> bool:
    got = digests.md5 if claim.algo == "md5" else digests.sha256
    return got is not None and got == claim.expected


def verify_claim(
    root: Root, claim: FileClaim, origin: str, cache: DigestCache, *, all_files: bool
) -> _Outcome:
    """Check one file on disk against its claim (runs on a worker thread)."""
    path = root.host_path(claim.relpath)
    listed_only = claim.algo is None
    try:
        real = root.resolve(claim.relpath)
        st = os.lstat(real)
    except FileNotFoundError:
        if listed_only or claim.optional:
            return _NOT_A_FILE
        return _Outcome(SkippedEntry(path, MISSING, origin, False, _seen(real, path, None)))
    except (OSError, HashingError) as e:
        reason = e.strerror if isinstance(e, OSError) else str(e)
        return _Outcome(SkippedEntry(path, f"cannot stat: {reason}", origin, fatal=True))
    if not statmod.S_ISREG(st.st_mode):
        if listed_only:
            return _NOT_A_FILE
        return _Outcome(SkippedEntry(path, NOT_REGULAR, origin, False, _seen(real, path, st)))
    if not all_files and not st.st_mode & 0o111:
        # Cheapest possible answer for the common case (documentation, data): 4 bytes.
        try:
            head = _head(real)
        except OSError as e:
            return _Outcome(SkippedEntry(path, f"unreadable: {e.strerror}", origin, fatal=True))
        if classify(head, st.st_mode, real) is FileKind.OTHER:
            return _Outcome(None)
    if claim.expected is None or claim.algo is None:
        if not all_files and not st.st_mode & 0o111 and is_script_name(real):
            # A script source the package lists without a digest (pip's RECORD lists the .pyc
            # files it compiled at install so): nothing to verify; `trustdb trust` can vouch.
            return _Outcome(None)
        return _Outcome(SkippedEntry(path, UNVERIFIABLE, origin, False, _seen(real, path, st)))
    if claim.size is not None and claim.size != st.st_size:
        reason, fatal = (CONFIG_CHANGED, False) if claim.config else (SIZE_MISMATCH, True)
        return _Outcome(SkippedEntry(path, reason, origin, fatal, _seen(real, path, st)))
    # Only the digest the package records is computed beside BLAKE3 (dpkg: MD5; rpm, pip:
    # SHA-256): each extra digest is a full pass over the bytes (issue 11: the import is bound
    # by the digests the package manager forces on us).
    want_md5 = claim.algo == "md5"
    want_sha256 = claim.algo == "sha256"
    key = InodeKey.from_stat(st)
    digests = cache.lookup(key, st.st_size, want_sha256=want_sha256, want_md5=want_md5)
    hashed = 0
    cached = cacheable = digests is not None
    if digests is None:
        try:
            result = hash_file(
                real, follow_symlinks=False, want_sha256=want_sha256, want_md5=want_md5
            )
        except HashingError as e:
            return _Outcome(SkippedEntry(path, str(e), origin, fatal=True))
        digests, key, hashed = result.digests, result.inode, result.digests.size
        cacheable = time.time() - result.stat.st_ctime >= FRESH_SECONDS
        st = result.stat
    if not _matches(digests, claim):
        reason, fatal = (CONFIG_CHANGED, False) if claim.config else (MISMATCH, True)
        skip = SkippedEntry(path, reason, origin, fatal, _seen(real, path, st))
        return _Outcome(skip, hashed, cached)
    kind = with_name(digests.kind, real)  # a verification cached before SCRIPT_SOURCE existed
    if kind is FileKind.OTHER and not all_files:
        return _Outcome(None, hashed, cached)
    entry = TrustEntry(
        path=path,
        digest=digests.blake3,
        size=digests.size,
        kind=kind,
        sha256=digests.sha256 if want_sha256 else None,
        origin=origin,
        inode=key if cacheable else None,
        md5=digests.md5 if want_md5 else None,
    )
    return _Outcome(entry, hashed, cached)


def _seen(real: str, path: str, st: os.stat_result | None) -> InodeKey | None:
    """The key under which a skip's verdict holds (`SkippedEntry.seen`; st None: the file was
    absent). None where a re-import could not check it the same way: the kept part's check
    looks at `path`, which is not where the file was found under a root with links resolved
    by hand; or the file changed too recently for its ctime to stand for its content."""
    if real != path:
        return None
    if st is None:
        return ABSENT
    if time.time() - st.st_ctime < FRESH_SECONDS:
        return None
    return InodeKey.from_stat(st)


@dataclass(frozen=True, slots=True)
class FingerprintedPackage:
    """A package whose records have a cheap fingerprint (their stat keys and fields): when
    the last import recorded the same one, and every file it recorded still has the same
    inode key, the package is kept as it is, without reading its records or its files (an
    unchanged re-import, issue 11). Any difference: it is read and verified in full."""

    origin: str
    fingerprint: bytes
    read: Callable[[], PackageClaims]


PackageSource = PackageClaims | Callable[[], PackageClaims] | FingerprintedPackage
"""A package's claims, or a function that reads them (run on a worker thread, so reading a
package database's per-package files overlaps with hashing)."""


@dataclass(frozen=True, slots=True)
class _Verified:
    pkg: PackageClaims | None
    outcomes: list[_Outcome]
    fingerprint: bytes | None = None
    kept: PartState | None = None
    origin: str = ""


def _verify_package(
    root: Root, source: PackageSource, cache: LockedCache, all_files: bool, label: str
) -> _Verified:
    fingerprint = None
    if isinstance(source, FingerprintedPackage):
        previous = cache.previous_part(label, source.origin)
        if (
            previous is not None
            and previous.fingerprint == source.fingerprint
            and _still_recorded(previous)
        ):
            return _Verified(None, [], source.fingerprint, previous, source.origin)
        fingerprint = source.fingerprint
        pkg = source.read()
    else:
        pkg = source if isinstance(source, PackageClaims) else source()
    outcomes = [verify_claim(root, c, pkg.origin, cache, all_files=all_files) for c in pkg.claims]
    return _Verified(pkg, outcomes, fingerprint, origin=pkg.origin)


def _still_recorded(part: PartState) -> bool:
    """Every file the part recorded is still a regular file with the same inode key and size
    (ctime moves on any change to a file, so its content is the content recorded), and every
    file it skipped is as it was judged: still absent, or still under the same key."""
    for raw, size, key in part.recorded:
        try:
            st = os.lstat(raw)
        except OSError:
            return False
        if st.st_size != size or not statmod.S_ISREG(st.st_mode) or InodeKey.from_stat(st) != key:
            return False
    for skip in part.skipped:
        try:
            seen = InodeKey.from_stat(os.lstat(skip.path))
        except FileNotFoundError:
            seen = ABSENT
        except OSError:
            return False
        if seen != skip.seen:
            return False
    return True


def verify_packages(
    root: Root,
    packages: Iterable[PackageSource],
    cache: DigestCache,
    stats: ImportStats,
    *,
    all_files: bool = False,
    total: int = 0,
    progress: ProgressFn | None = None,
    workers: int = WORKERS,
    label: str = "",
) -> Iterator[StreamItem]:
    """Verify packages on a thread pool, yielding results in package order.

    At most `2 * workers` packages are in flight, so memory stays flat on any system size.
    `label` (the source's) finds the last import's record of a FingerprintedPackage.
    """
    locked = LockedCache(cache)
    window: deque[Future[_Verified]] = deque()
    done = 0
    with (
        mapping_allowed(),  # large files are hashed from mappings (trustdb.mapped): no copies
        ThreadPoolExecutor(max_workers=workers, thread_name_prefix="trustdb-verify") as pool,
    ):
        it = iter(packages)
        exhausted = False
        while True:
            while not exhausted and len(window) < 2 * workers:
                pkg = next(it, None)
                if pkg is None:
                    exhausted = True
                    break
                window.append(
                    pool.submit(_verify_package, root, pkg, locked, all_files, label)
                )
            if not window:
                break
            yield from _results(window.popleft().result(), stats)
            done += 1
            if progress is not None:
                progress(done, total)


def _results(verified: _Verified, stats: ImportStats) -> Iterator[StreamItem]:
    """One package's stream items, counted into `stats`."""
    stats.packages += 1
    kept = verified.kept
    if kept is not None:
        stats.files += kept.files
        stats.not_executable += kept.not_executable
        stats.recorded += len(kept.recorded)
        stats.cache_hits += len(kept.recorded)
        stats.bytes_recorded += sum(size for _p, size, _k in kept.recorded)
        stats.packages_kept += 1
        for skip in kept.skipped:
            stats.skipped += 1
            stats.fatal += skip.fatal
            yield skip
        yield KeptPart(verified.origin)
        return
    assert verified.pkg is not None
    files = not_executable = 0
    for skip in verified.pkg.skipped:
        stats.skipped += 1
        stats.fatal += skip.fatal
        yield skip
    for outcome in verified.outcomes:
        if not outcome.counted:
            continue
        files += 1
        stats.bytes_hashed += outcome.hashed
        stats.cache_hits += outcome.cached
        item = outcome.item
        if item is None:
            not_executable += 1
            continue
        if isinstance(item, SkippedEntry):
            stats.skipped += 1
            stats.fatal += item.fatal
        else:
            stats.recorded += 1
            stats.bytes_recorded += item.size
        yield item
    stats.files += files
    stats.not_executable += not_executable
    if verified.fingerprint is not None:
        yield PartDone(verified.origin, verified.fingerprint, files, not_executable)


class OnDiskImporter(Importer):
    """Base of the importers that verify a package database's claims against a root on disk.

    Subclasses read their database into `PackageClaims` and hand them to `verify`; `stats`
    fills in as the stream is consumed.
    """

    def __init__(self, *, root: str, all_files: bool, progress: ProgressFn | None) -> None:
        self.root = Root(root)
        self.all_files = all_files
        self.progress = progress
        self.stats = ImportStats()

    def verify(
        self, packages: Iterable[PackageSource], total: int, cache: DigestCache
    ) -> Iterator[StreamItem]:
        return verify_packages(
            self.root,
            packages,
            cache,
            self.stats,
            all_files=self.all_files,
            total=total,
            progress=self.progress,
            label=self.source().label,
        )
