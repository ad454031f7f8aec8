"""RPM packages: package files (`.rpm`) and the installed packages of a system (`rpmdb.sqlite`).

Both read the same thing, an RPM header, whose file list carries a digest per file
(RPMTAG_FILEDIGESTS, in the algorithm RPMTAG_FILEDIGESTALGO names; MD5 when the tag is absent).

- `RpmFileImporter`: one `.rpm` file. Every payload member is hashed from the payload itself (no
  rpm binary, nothing unpacked to disk), checked against its header digest and size, and refused
  when it does not match. gzip, bzip2, xz and zstd payloads. A truncated or corrupt package is
  refused as a whole: a package that is not what its vendor shipped vouches for nothing.
- `RpmDbImporter`: the rpmdb of a root (rpm >= 4.16 keeps it in sqlite, under
  `usr/lib/sysimage/rpm/` or `var/lib/rpm/`). Each installed file is verified on disk against
  its header digest (see `ondisk`); mismatches are reported by package and path and not trusted,
  and the rest proceeds. An unreadable, corrupt or locked rpmdb refuses the whole import.

What is recorded: executable content (ELF, `#!`, exec bit), like `trustdb trust`; directories,
symlinks, ghosts and documentation that cannot execute are left out. `all_files=True` records
every verified regular file.

The header parser is ours (`rpmheader`, about 60 lines): rpmfile's parser needs the header
magic, which the blobs in `rpmdb.sqlite` do not carry, cannot read INT64 (RPMTAG_LONGFILESIZES)
and returns a one-element array as a scalar. Its payload reader decompresses zstd payloads whole
and seeks backwards per member; ours streams the cpio archive once.
"""

from __future__ import annotations

import bz2
import gzip
import hashlib
import lzma
import os
import sqlite3
import zlib
from collections.abc import Callable, Iterator
from typing import IO, TypeVar

import zstandard
from trustdb_importers.interface import DigestCache, Importer, ImporterError, SourceInfo
from trustdb_importers.ondisk import (
    MISMATCH,
    SIZE_MISMATCH,
    FileClaim,
    ImportStats,
    OnDiskImporter,
    PackageClaims,
    ProgressFn,
)
from trustdb_importers.rpmheader import (
    LEAD_MAGIC,
    LEAD_SIZE,
    ONDISK_ALGOS,
    RPMFILE_CONFIG,
    RPMFILE_STATE_NORMAL,
    HeaderError,
    PackageHeader,
    package_header,
    parse_header_blob,
    read_header,
)

from trustdb.hashing import classify, hash_bytes
from trustdb.model import FileKind, SkippedEntry, TrustEntry

RPMDB_LOCATIONS = ("usr/lib/sysimage/rpm", "var/lib/rpm")
_Row = TypeVar("_Row")

class RpmImporterError(ImporterError):
    """An rpmdb or a package file as a whole cannot be read: that import is refused."""


# --- package files -------------------------------------------------------------------------


class RpmFileImporter(Importer):
    """One `.rpm` package file, verified member by member from its payload.

    Its label is `rpmfile:NAME.ARCH`: importing a newer build of the same package replaces the
    older one's files, as installing it would.
    """

    name = "rpmfile"

    def __init__(self, *, path: str, all_files: bool = False) -> None:
        self.path = path
        self.all_files = all_files
        self.stats = ImportStats()
        self._header: PackageHeader | None = None

    def header(self) -> PackageHeader:
        if self._header is None:
            with self._open() as f:
                self._header = self._read_headers(f)
        return self._header

    def source(self) -> SourceInfo:
        hdr = self.header()
        return SourceInfo(label=f"rpmfile:{hdr.name}.{hdr.arch}", kind=self.name)

    def _open(self) -> IO[bytes]:
        try:
            return open(self.path, "rb")
        except OSError as e:
            raise RpmImporterError(f"{self.path}: cannot open: {e.strerror}") from e

    def _read_headers(self, f: IO[bytes]) -> PackageHeader:
        try:
            lead = f.read(LEAD_SIZE)
            if len(lead) < LEAD_SIZE or lead[:4] != LEAD_MAGIC:
                raise HeaderError("not an RPM package (bad lead magic)")
            read_header(f, pad=True)  # signature header: its digests cover what we check
            hdr = package_header(read_header(f, pad=False))
        except HeaderError as e:
            raise RpmImporterError(f"{self.path}: corrupt package header: {e}") from e
        except OSError as e:
            raise RpmImporterError(f"{self.path}: read error: {e.strerror}") from e
        if hdr.is_source:
            raise RpmImporterError(f"{self.path}: a source package holds nothing to execute")
        if hdr.algo_name is None:
            raise RpmImporterError(
                f"{self.path}: unknown file digest algorithm {hdr.algo}: package refused"
            )
        return hdr

    def collect(self, cache: DigestCache) -> Iterator[TrustEntry | SkippedEntry]:
        with self._open() as f:
            hdr = self._read_headers(f)
            self._header = hdr
            self.stats.packages = 1
            try:
                yield from self._members(f, hdr)
            except (
                EOFError,
                OSError,
                ValueError,  # a cpio header field that is not hex
                lzma.LZMAError,
                zlib.error,
                zstandard.ZstdError,
            ) as e:
                raise RpmImporterError(
                    f"{self.path}: truncated or corrupt payload ({e}): package refused"
                ) from e

    def _members(self, f: IO[bytes], hdr: PackageHeader) -> Iterator[TrustEntry | SkippedEntry]:
        index = {"./" + p.lstrip("/"): i for i, p in enumerate(hdr.files)}
        pending: dict[int, list[int]] = {}  # hardlink sets: cpio ino -> members without data
        seen: set[int] = set()
        with _decompress(f, hdr.payload_compressor, self.path) as payload:
            for name, i, ino, nlink, data in _cpio(payload, hdr):
                if i is None:
                    i = index.get(name)
                if i is None:
                    raise RpmImporterError(f"{self.path}: payload member {name} not in header")
                seen.add(i)
                if not hdr.is_regular(i):
                    continue
                if nlink > 1 and not data and hdr.sizes[i]:
                    pending.setdefault(ino, []).append(i)  # content comes with the last link
                    continue
                for j in (*pending.pop(ino, []), i):
                    item = self._member(hdr, j, data)
                    if item is not None:
                        yield item
        missing = [
            hdr.files[i]
            for i in range(len(hdr.files))
            if hdr.is_regular(i) and (i not in seen or any(i in v for v in pending.values()))
        ]
        if missing:
            raise RpmImporterError(
                f"{self.path}: payload lacks {len(missing)} file(s) its header lists "
                f"(first: {missing[0]}): package refused"
            )

    def _member(self, hdr: PackageHeader, i: int, data: bytes) -> TrustEntry | SkippedEntry | None:
        path = hdr.files[i]
        self.stats.files += 1
        algo = hdr.algo_name
        assert algo is not None
        if len(data) != hdr.sizes[i]:
            return self._skip(SkippedEntry(path, SIZE_MISMATCH, hdr.nevra, fatal=True))
        if hashlib.new(algo, data).hexdigest() != hdr.digests[i].lower():
            return self._skip(SkippedEntry(path, MISMATCH, hdr.nevra, fatal=True))
        kind = classify(data[:4], hdr.modes[i], path)
        if kind is FileKind.OTHER and not self.all_files:
            self.stats.not_executable += 1
            return None
        self.stats.recorded += 1
        self.stats.bytes_hashed += len(data)
        self.stats.bytes_recorded += len(data)
        return TrustEntry(
            path=path,
            digest=hash_bytes(data),
            size=len(data),
            kind=kind,
            sha256=hashlib.sha256(data).digest(),
            origin=hdr.nevra,
        )

    def _skip(self, entry: SkippedEntry) -> SkippedEntry:
        self.stats.skipped += 1
        self.stats.fatal += entry.fatal
        return entry


def _decompress(f: IO[bytes], compressor: str, path: str) -> IO[bytes]:
    if compressor == "gzip":
        return gzip.GzipFile(fileobj=f, mode="rb")  # type: ignore[return-value]
    if compressor in ("xz", "lzma"):
        return lzma.LZMAFile(f)
    if compressor == "bzip2":
        return bz2.BZ2File(f)
    if compressor == "zstd":
        return zstandard.ZstdDecompressor().stream_reader(f)  # type: ignore[return-value]
    raise RpmImporterError(f"{path}: unknown payload compressor {compressor!r}: package refused")


def _read_exact(f: IO[bytes], n: int) -> bytes:
    chunks = []
    while n > 0:
        chunk = f.read(n)
        if not chunk:
            raise EOFError("payload ends in the middle of the archive")
        chunks.append(chunk)
        n -= len(chunk)
    return b"".join(chunks)


def _cpio(
    payload: IO[bytes], hdr: PackageHeader
) -> Iterator[tuple[str, int | None, int, int, bytes]]:
    """Members of an rpm cpio payload: (name, header index if known, ino, nlink, content).

    Handles both the `070701` (newc) format and rpm's `07070X` stripped format (rpm >= 4.12 for
    packages with files over 4 GiB), whose entries only carry an index into the header.
    """
    offset = 0
    while True:
        magic = _read_exact(payload, 6)
        if magic == b"07070X":
            i = int(_read_exact(payload, 8), 16)
            offset += 14
            if i >= len(hdr.files):
                raise EOFError(f"stripped cpio entry {i} beyond the header's file list")
            size = hdr.sizes[i] if hdr.is_regular(i) else 0
            data = _read_exact(payload, size)
            offset += size
            _read_exact(payload, -offset % 4)
            offset += -offset % 4
            yield hdr.files[i], i, -1 - i, 1, data
            continue
        if magic != b"070701":
            raise EOFError(f"bad cpio magic {magic!r}")
        fields = _read_exact(payload, 104)
        ino, nlink, filesize, namesize = (int(fields[k : k + 8], 16) for k in (0, 24, 48, 88))
        offset += 110
        name = _read_exact(payload, namesize)[:-1].decode("utf-8", "surrogateescape")
        offset += namesize
        _read_exact(payload, -offset % 4)
        offset += -offset % 4
        if name == "TRAILER!!!":
            return
        data = _read_exact(payload, filesize)
        offset += filesize
        _read_exact(payload, -offset % 4)
        offset += -offset % 4
        yield name, None, ino, nlink, data


# --- installed packages --------------------------------------------------------------------


class RpmDbImporter(OnDiskImporter):
    """Every installed package of a root's rpmdb, verified on disk."""

    name = "rpm"

    def __init__(
        self,
        *,
        root: str = "/",
        dbpath: str | None = None,
        all_files: bool = False,
        progress: ProgressFn | None = None,
        timeout: float = 5.0,
    ) -> None:
        super().__init__(root=root, all_files=all_files, progress=progress)
        self.dbpath = dbpath
        self.timeout = timeout

    def source(self) -> SourceInfo:
        """`rpm:ROOT`, or `rpm:ROOT#DBPATH` for another database than the root's own (dnf's or
        rpm's `--dbpath`, Debian's ~/.rpmdb): its own source, so that importing it does not
        replace what the root's rpmdb vouches for."""
        label = f"rpm:{self.root.path}"
        if self.dbpath and os.path.normpath(self.dbpath).strip("/") not in RPMDB_LOCATIONS:
            label += f"#{self.dbpath}"
        return SourceInfo(label=label, kind=self.name)

    def find_rpmdb(self) -> str:
        """The rpmdb.sqlite of the root (or of --dbpath, which like rpm's is inside the root)."""
        dirs = [self.dbpath] if self.dbpath else list(RPMDB_LOCATIONS)
        for d in dirs:
            base = d if os.path.isabs(d) and self.root.path == "/" else self.root.host_path(d)
            candidate = os.path.join(base, "rpmdb.sqlite")
            if os.path.exists(candidate):
                return candidate
            for legacy, backend in (("Packages", "Berkeley DB"), ("Packages.db", "ndb")):
                if os.path.exists(os.path.join(base, legacy)):
                    raise RpmImporterError(
                        f"{base}: rpmdb uses the {backend} backend; only sqlite (rpm >= 4.16) "
                        "is read (convert it with `rpmdb --rebuilddb`)"
                    )
        where = " or ".join(self.root.host_path(d) for d in dirs)
        raise RpmImporterError(f"no rpmdb.sqlite under {where}")

    def collect(self, cache: DigestCache) -> Iterator[TrustEntry | SkippedEntry]:
        path = self.find_rpmdb()
        packages = self.read_rpmdb(path)
        yield from self.verify(packages, len(packages), cache)

    def read_rpmdb(self, path: str) -> list[PackageClaims]:
        """Every package's claims, read in one sqlite statement (one consistent snapshot)."""
        return self._read_rows(path, lambda hnum, blob: self.package_claims(path, hnum, blob))

    def read_headers(self, path: str) -> list[tuple[int, bytes]]:
        """Every package's raw header, read in one sqlite statement (one consistent snapshot),
        for a caller that parses them a few at a time (`package_claims`)."""
        return self._read_rows(path, lambda hnum, blob: (hnum, blob))

    def _read_rows(self, path: str, each: Callable[[int, bytes], _Row]) -> list[_Row]:
        uri = f"file:{path}?mode=ro"
        try:
            con = sqlite3.connect(uri, uri=True, timeout=self.timeout)
        except sqlite3.Error as e:
            raise RpmImporterError(f"{path}: cannot open rpmdb: {e}") from e
        try:
            rows = con.execute("SELECT hnum, blob FROM Packages ORDER BY hnum")
            return [each(hnum, bytes(blob)) for hnum, blob in rows]
        except sqlite3.OperationalError as e:
            if "locked" in str(e) or "busy" in str(e):
                raise RpmImporterError(
                    f"{path}: rpmdb is locked (an rpm transaction is running?): import refused, "
                    "retry when it is done"
                ) from e
            raise RpmImporterError(f"{path}: cannot read rpmdb: {e}: import refused") from e
        except sqlite3.DatabaseError as e:
            raise RpmImporterError(f"{path}: corrupt rpmdb: {e}: import refused") from e
        finally:
            con.close()

    def package_claims(self, dbfile: str, hnum: int, blob: bytes) -> PackageClaims:
        try:
            hdr = package_header(parse_header_blob(blob))
        except HeaderError as e:
            # One bad header loses that package's files, not the whole system's.
            reason = f"corrupt package header #{hnum}: {e}: its files are not trusted"
            return PackageClaims(f"#{hnum}", (), (SkippedEntry(dbfile, reason, "", fatal=True),))
        algo = hdr.algo_name
        if algo not in ONDISK_ALGOS:
            name = algo or f"unknown ({hdr.algo})"
            reason = f"file digest algorithm {name} not supported: its files are not trusted"
            return PackageClaims(hdr.nevra, (), (SkippedEntry(dbfile, reason, hdr.nevra, True),))
        try:
            claims = tuple(
                FileClaim(
                    hdr.files[i],
                    algo,
                    bytes.fromhex(hdr.digests[i]),
                    hdr.sizes[i],
                    config=bool(hdr.flags[i] & RPMFILE_CONFIG),
                )
                for i in range(len(hdr.files))
                if hdr.is_regular(i) and hdr.states[i] == RPMFILE_STATE_NORMAL and hdr.digests[i]
            )
        except ValueError:
            reason = "corrupt package header: a file digest is not hex: its files are not trusted"
            return PackageClaims(hdr.nevra, (), (SkippedEntry(dbfile, reason, hdr.nevra, True),))
        return PackageClaims(hdr.nevra, claims)
