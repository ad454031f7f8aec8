"""The RPM header format, read by our own parser (see `trustdb_importers.rpm` for why not
rpmfile's): the tags trustdb uses, the index/store layout of one header, and `PackageHeader`,
the fields of one package that the importers need. Shared by package files and the rpmdb."""

from __future__ import annotations

import stat as statmod
import struct
from dataclasses import dataclass
from typing import IO

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

HeaderValue = str | bytes | tuple[int, ...] | tuple[str, ...]


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
