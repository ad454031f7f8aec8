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

The header parser is ours (about 60 lines): rpmfile's parser needs the header magic, which the
blobs in `rpmdb.sqlite` do not carry, cannot read INT64 (RPMTAG_LONGFILESIZES) and returns a
one-element array as a scalar. Its payload reader decompresses zstd payloads whole and seeks
backwards per member; ours streams the cpio archive once.
"""

from __future__ import annotations

import bz2
import gzip
import hashlib
import lzma
import os
import sqlite3
import stat as statmod
import struct
import zlib
from collections.abc import Iterator
from dataclasses import dataclass
from typing import IO

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

from trustdb.hashing import classify, hash_bytes
from trustdb.model import FileKind, SkippedEntry, TrustEntry

# Header tags (rpm's lib/rpmtag.h).
TAG_NAME, TAG_VERSION, TAG_RELEASE, TAG_EPOCH = 1000, 1001, 1002, 1003
TAG_ARCH = 1022
TAG_OLDFILENAMES = 1027
TAG_FILESIZES, TAG_FILESTATES, TAG_FILEMODES = 1028, 1029, 1030
TAG_FILEDIGESTS, TAG_FILEFLAGS = 1035, 1037
TAG_SOURCERPM = 1044
TAG_DIRINDEXES, TAG_BASENAMES, TAG_DIRNAMES = 1116, 1117, 1118
TAG_PAYLOADFORMAT, TAG_PAYLOADCOMPRESSOR = 1124, 1125
TAG_LONGFILESIZES, TAG_FILEDIGESTALGO = 5008, 5011

RPMFILE_CONFIG = 1 << 0
"""%config: the admin is expected to edit it; a changed one is reported, not a failure."""
RPMFILE_GHOST = 1 << 6
"""%ghost: owned, never shipped (no content in the payload, nothing to verify)."""
RPMFILE_STATE_NORMAL = 0
"""Other states (replaced, not installed, net shared, wrong color) mean the package's copy is
not what sits on disk, so there is nothing of this package's to verify."""

DIGEST_ALGOS = {1: "md5", 2: "sha1", 8: "sha256", 9: "sha384", 10: "sha512", 11: "sha224"}
"""RPMTAG_FILEDIGESTALGO values (PGP hash algorithm numbers)."""
ONDISK_ALGOS = frozenset({"md5", "sha256"})
"""Algorithms the single-pass on-disk hasher computes alongside BLAKE3."""

LEAD_SIZE = 96
LEAD_MAGIC = b"\xed\xab\xee\xdb"
HEADER_MAGIC = b"\x8e\xad\xe8\x01"
MAX_HEADER = 256 << 20
"""rpm's own limit on a header's data size; larger means corrupt."""

RPMDB_LOCATIONS = ("usr/lib/sysimage/rpm", "var/lib/rpm")

HeaderValue = str | bytes | tuple[int, ...] | tuple[str, ...]


class RpmImporterError(ImporterError):
    """An rpmdb or a package file as a whole cannot be read: that import is refused."""


class HeaderError(Exception):
    """One header is malformed (message names what is wrong)."""


# --- the header format ---------------------------------------------------------------------


def parse_header_blob(blob: bytes) -> dict[int, HeaderValue]:
    """Parse a header without its magic: il, dl, il index entries, dl bytes of data."""
    if len(blob) < 8:
        raise HeaderError("header shorter than its size fields")
    il, dl = struct.unpack_from(">II", blob)
    if il > 0xFFFF or dl > MAX_HEADER or len(blob) < 8 + 16 * il + dl:
        raise HeaderError(f"header sizes out of range ({il} tags, {dl} data bytes)")
    data = blob[8 + 16 * il : 8 + 16 * il + dl]
    tags: dict[int, HeaderValue] = {}
    for i in range(il):
        tag, typ, off, count = struct.unpack_from(">IIiI", blob, 8 + 16 * i)
        if off < 0 or off > dl:
            raise HeaderError(f"tag {tag}: offset out of range")
        tags[tag] = _value(typ, data, off, count, tag)
    return tags


_INT_FORMATS = {2: "B", 3: "H", 4: "I", 5: "Q"}


def _value(typ: int, data: bytes, off: int, count: int, tag: int) -> HeaderValue:
    if typ in _INT_FORMATS:
        fmt = f">{count}{_INT_FORMATS[typ]}"
        if off + struct.calcsize(fmt) > len(data):
            raise HeaderError(f"tag {tag}: array runs past the header")
        return tuple(struct.unpack_from(fmt, data, off))
    if typ == 1 or typ == 7:  # CHAR, BIN
        if off + count > len(data):
            raise HeaderError(f"tag {tag}: data runs past the header")
        return data[off : off + count]
    if typ in (6, 8, 9):  # STRING, STRING_ARRAY, I18NSTRING
        strings = []
        for _ in range(count if typ != 6 else 1):
            end = data.find(b"\0", off)
            if end < 0:
                raise HeaderError(f"tag {tag}: unterminated string")
            strings.append(data[off:end].decode("utf-8", "surrogateescape"))
            off = end + 1
        return strings[0] if typ == 6 else tuple(strings)
    return b""  # NULL or unknown types carry nothing we read


def read_header(f: IO[bytes], *, pad: bool) -> dict[int, HeaderValue]:
    """Read one magic-prefixed header from a package file (signature headers are 8-padded)."""
    intro = f.read(16)
    if len(intro) < 16 or intro[:4] != HEADER_MAGIC:
        raise HeaderError("bad header magic (not an RPM package, or truncated)")
    il, dl = struct.unpack_from(">II", intro, 8)
    if il > 0xFFFF or dl > MAX_HEADER:
        raise HeaderError(f"header sizes out of range ({il} tags, {dl} data bytes)")
    body = f.read(16 * il + dl)
    if len(body) < 16 * il + dl:
        raise HeaderError("header truncated")
    if pad and dl % 8:
        f.read(8 - dl % 8)
    return parse_header_blob(intro[8:16] + body)


@dataclass(frozen=True, slots=True)
class PackageHeader:
    """The parts of a main header the importers use."""

    name: str
    epoch: int
    version: str
    release: str
    arch: str
    files: tuple[str, ...]
    digests: tuple[str, ...]
    sizes: tuple[int, ...]
    modes: tuple[int, ...]
    flags: tuple[int, ...]
    states: bytes
    algo: int
    is_source: bool
    payload_compressor: str

    @property
    def nevra(self) -> str:
        return f"{self.name}-{self.epoch}:{self.version}-{self.release}.{self.arch}"

    @property
    def algo_name(self) -> str | None:
        return DIGEST_ALGOS.get(self.algo)

    def is_regular(self, i: int) -> bool:
        return statmod.S_ISREG(self.modes[i]) and not self.flags[i] & RPMFILE_GHOST


def _ints(tags: dict[int, HeaderValue], tag: int, default: tuple[int, ...] = ()) -> tuple[int, ...]:
    value = tags.get(tag, default)
    if not isinstance(value, tuple) or not all(isinstance(v, int) for v in value):
        raise HeaderError(f"tag {tag} is not an integer array")
    return value  # type: ignore[return-value]


def _strs(tags: dict[int, HeaderValue], tag: int) -> tuple[str, ...]:
    value = tags.get(tag, ())
    if not isinstance(value, tuple) or not all(isinstance(v, str) for v in value):
        raise HeaderError(f"tag {tag} is not a string array")
    return value  # type: ignore[return-value]


def _str(tags: dict[int, HeaderValue], tag: int, default: str = "") -> str:
    value = tags.get(tag, default)
    first = value[0] if isinstance(value, tuple) and len(value) == 1 else value  # I18NSTRING
    if not isinstance(first, str):
        raise HeaderError(f"tag {tag} is not a string")
    return first


def package_header(tags: dict[int, HeaderValue]) -> PackageHeader:
    """Extract and cross-check the file list (every per-file array has one value per file)."""
    name = _str(tags, TAG_NAME)
    if not name:
        raise HeaderError("no package name")
    if TAG_BASENAMES in tags:
        basenames = _strs(tags, TAG_BASENAMES)
        dirnames = _strs(tags, TAG_DIRNAMES)
        dirindexes = _ints(tags, TAG_DIRINDEXES)
        if len(dirindexes) != len(basenames) or any(d >= len(dirnames) for d in dirindexes):
            raise HeaderError("file list is inconsistent (dirindexes)")
        files = tuple(dirnames[d] + b for d, b in zip(dirindexes, basenames, strict=True))
    else:
        files = _strs(tags, TAG_OLDFILENAMES)
    n = len(files)
    sizes = (
        _ints(tags, TAG_LONGFILESIZES) if TAG_LONGFILESIZES in tags else _ints(tags, TAG_FILESIZES)
    )
    digests = _strs(tags, TAG_FILEDIGESTS)
    modes = _ints(tags, TAG_FILEMODES)
    flags = _ints(tags, TAG_FILEFLAGS, (0,) * n)
    states = tags.get(TAG_FILESTATES, bytes(n))
    if not isinstance(states, bytes):
        raise HeaderError("file states have the wrong type")
    if n and not (len(sizes) == len(digests) == len(modes) == len(flags) == len(states) == n):
        raise HeaderError("per-file arrays disagree in length")
    algo = _ints(tags, TAG_FILEDIGESTALGO, (1,))
    epoch = _ints(tags, TAG_EPOCH, (0,))
    return PackageHeader(
        name=name,
        epoch=epoch[0] if epoch else 0,
        version=_str(tags, TAG_VERSION),
        release=_str(tags, TAG_RELEASE),
        arch=_str(tags, TAG_ARCH, "noarch"),
        files=files,
        digests=digests,
        sizes=sizes,
        modes=modes,
        flags=flags,
        states=states,
        algo=algo[0] if algo else 1,
        is_source=TAG_SOURCERPM not in tags,
        payload_compressor=_str(tags, TAG_PAYLOADCOMPRESSOR, "gzip"),
    )


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
        return SourceInfo(label=f"rpm:{self.root.path}", kind=self.name)

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
        uri = f"file:{path}?mode=ro"
        try:
            con = sqlite3.connect(uri, uri=True, timeout=self.timeout)
        except sqlite3.Error as e:
            raise RpmImporterError(f"{path}: cannot open rpmdb: {e}") from e
        try:
            rows = con.execute("SELECT hnum, blob FROM Packages ORDER BY hnum")
            return [self._claims(path, hnum, blob) for hnum, blob in rows]
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

    def _claims(self, dbfile: str, hnum: int, blob: bytes) -> PackageClaims:
        try:
            hdr = package_header(parse_header_blob(bytes(blob)))
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
