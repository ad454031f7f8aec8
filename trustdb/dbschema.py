"""The trust database's on-disk format: keys, values and their encoding (used by `trustdb.db`).

SCHEMA (version 2). This docstring is the one place the on-disk format is described.

One LMDB environment in a directory (default /var/lib/trustdb; `--db` / `TRUSTDB_DB`), holding
`data.mdb` and `lock.mdb`, plus `writer.lock` (see "Writers" below). All tables live in LMDB's
main database, each under a one-byte key prefix: named sub-databases would need a write
transaction just to open their handles, which would make every writable open wait behind a
running writer. Integers in keys are big-endian so that keys sort numerically; integers in
values are little-endian. Paths are raw bytes (`os.fsencode`: names that are not UTF-8 survive).

    M meta      "M" + b"schema"      -> u32   schema version; a newer one is refused (SchemaError)
                "M" + b"generation"  -> u64   +1 on every commit that changes what is trusted
                "M" + b"next_sid"    -> u32   next source id to hand out
    S sources   "S" + label (utf-8)  -> <u32 sid, u64 entries, f64 updated> + kind (utf-8)
    I source_id "I" + sid (u32)      -> label (utf-8)
    E entries   "E" + EK             -> digest[32] + <f64 trusted_at, u16 len(path)> + path + origin
                EK ("entry key") = PK + 0x00 + sid (u32). One (path, source) fact: "source SID
                vouches for content DIGEST at PATH". PK ("path key") is the path itself when it
                is at most 400 bytes, else its first 360 bytes + 0xFF + BLAKE3(path)[:16] (LMDB
                keys are limited to 511 bytes). So entries sort by path, and the value always
                holds the full path.
    D by digest "D" + digest[32] + EK -> ""   who vouches for this content
    O by source "O" + sid (u32) + EK  -> ""   what a source vouches for
    C content   "C" + digest[32]     -> <u64 size, u8 kind, u8 flags, 6 pad, f64 first, f64 last>
                                        (kind: model.FileKind; 4 = SCRIPT_SOURCE, new in v2)
                                        [+ sha256[32] if flags & 1]
                Present exactly while at least one entry names the digest: removing the last
                entry of a digest removes its content record in the same transaction.
    V verified  "V" + <dev u64, ino u64>
                                     -> <i64 ctime_sec, u32 ctime_nsec, u64 size> + blake3[32]
                                        + <u8 kind, u8 flags, f64 hashed_at>
                                        [+ sha256[32] if flags & 1] [+ md5[16] if flags & 2]
                A cache of the last read of each on-disk inode: a lookup hits only when ctime
                and size still match (`InodeKey` + size), so an unchanged file is not read
                again, and a newer version simply overwrites the record. Not trust: a cached
                file is trusted only through `C`.
    L changes   "L" + generation (u64) -> <u32 paths, u32 removed, u32 added>
                                        + removed digests[32 each] + added digests[32 each]
                                        + the paths, NUL-separated (raw bytes)
                What the commit that made this generation changed: the paths whose entries
                were written or deleted, the digests whose content record disappeared or
                appeared. `paths` = 0xFFFFFFFF: too many to list (a full re-mirror is needed).
                The last CHANGE_LOG_KEEP generations are kept, so `Mirror.refresh` touches only
                what changed; a reader further behind re-mirrors everything.

    P parts     "P" + sid (u32) + part name (utf-8)
                                     -> fingerprint[32] + <u32 files, u32 not_executable, u32 n>
                                        + n x (<u64 dev, u64 ino, i64 ctime_sec, u32 ctime_nsec,
                                        u64 size, u16 len(path)> + path)
                                        [+ <u32 m> + m x (<u64 dev, u64 ino, i64 ctime_sec,
                                        u32 ctime_nsec, u8 fatal, u16 len(path), u16
                                        len(reason)> + path + reason)]
                What the last import saw of one part of a source (a package): the digest of its
                package-database records and their stat keys, the inode key of every file it
                recorded, and of every file it skipped with a verdict that holds while the key
                does (a mismatch; a missing file has key 0, `model.ABSENT`). An import that
                finds the same fingerprint and the same keys keeps the part's entries and repeats
                its skips, without reading them again (`model.KeptPart`). Written only for a part
                whose every file was recorded and cacheable, or skipped with such a key; all of
                a source's parts are dropped when any of its paths is untrusted by hand, so
                nothing is kept that a user removed. Not trust: only a hint for the importer.

Versions. 2 added FileKind.SCRIPT_SOURCE and the L table. Version 1 databases are read as they
are and stamped 2 by their first write; a trustdb that knows only version 1 refuses a version 2
database with its one-line SchemaError (it could not decode kind 4).

Transactions. Every write method is exactly one LMDB write transaction: all or nothing, also
under `kill -9` (LMDB never overwrites the last committed state). Readers never block and
never wait for writers (MVCC). The map grows fourfold when a transaction fills it; the
whole transaction is then retried from the (recorded) input.

Writers. LMDB serialises writers by blocking the second one until the first commits, which
for a long import means an unexplained hang. A writer therefore first takes a non-blocking
`flock` on `writer.lock` (which records its pid and command) and fails with BusyError naming
the holder, after waiting at most `busy_timeout` seconds (default 0: fail at once). The lock
is held for one write method call. `record_verification` is only a cache write: when the lock
is busy it skips the write instead of failing.

Generation. Bumped only by commits that change trust (entries, content, sources): a write
that changes nothing is aborted and leaves the generation as it was, and verification-cache
writes never bump it (the mirror caches as it goes and must not wake itself up).
"""

from __future__ import annotations

import os
import struct
from collections.abc import Iterator

import blake3
import lmdb

from trustdb.model import FileDigests, FileKind, InodeKey, TrustEntry

SCHEMA_VERSION = 2

CHANGE_LOG_KEEP = 256
"""Generations whose change records are kept (older ones are deleted as new ones are written)."""

MAX_LOGGED_PATHS = 200_000
"""A commit that changes more paths is logged as "everything" (a full re-mirror is cheaper)."""

_MAX_DIRECT_PATH_KEY = 400
_LONG_PATH_PREFIX = 360

_U32 = struct.Struct(">I")
_U64LE = struct.Struct("<Q")
_SOURCE = struct.Struct("<IQd")
_ENTRY = struct.Struct("<dH")
_CONTENT = struct.Struct("<QBB6xdd")
_VERIFIED_KEY = struct.Struct(">QQ")
_VERIFIED_VERSION = struct.Struct("<qIQ")
_VERIFIED = struct.Struct("<BBd")
_FLAG_SHA256 = 1
_FLAG_MD5 = 2

# Table prefixes (see SCHEMA).
_META, _SOURCES, _SOURCE_IDS, _ENTRIES = b"M", b"S", b"I", b"E"
_CHANGES = b"L"
_CHANGE_HEAD = struct.Struct("<III")
_ALL_CHANGED = 0xFFFFFFFF
_BY_DIGEST, _BY_SOURCE, _CONTENT_T, _VERIFIED_T = b"D", b"O", b"C", b"V"
_PARTS = b"P"
_PART_HEAD = struct.Struct("<III")
_PART_FILE = struct.Struct("<QQqIQH")
_PART_SKIP = struct.Struct("<QQqIBHH")


def path_key(path: str) -> bytes:
    """The sortable LMDB key part for a path (see SCHEMA: PK)."""
    raw = os.fsencode(path)
    if len(raw) <= _MAX_DIRECT_PATH_KEY:
        return raw
    return raw[:_LONG_PATH_PREFIX] + b"\xff" + blake3.blake3(raw).digest()[:16]


def _entry_key(path: str, sid: int) -> bytes:
    """EK (see SCHEMA), without the table prefix."""
    return path_key(path) + b"\0" + _U32.pack(sid)


def _decode_entry(value: bytes) -> tuple[bytes, float, str, str]:
    """-> digest, trusted_at, path, origin."""
    trusted_at, plen = _ENTRY.unpack_from(value, 32)
    start = 32 + _ENTRY.size
    path = os.fsdecode(value[start : start + plen])
    origin = value[start + plen :].decode("utf-8", "replace")
    return value[:32], trusted_at, path, origin


def _encode_entry(digest: bytes, trusted_at: float, path: str, origin: str) -> bytes:
    raw = os.fsencode(path)
    return digest + _ENTRY.pack(trusted_at, len(raw)) + raw + origin.encode()


def _verified_key(key: InodeKey) -> bytes:
    return _VERIFIED_T + _VERIFIED_KEY.pack(key.dev, key.ino)


def _verified_version(key: InodeKey, size: int) -> bytes:
    return _VERIFIED_VERSION.pack(key.ctime_sec, key.ctime_nsec, size)


def _scan(txn: lmdb.Transaction[bytes], prefix: bytes) -> Iterator[tuple[bytes, bytes]]:
    """Every (key, value) whose key starts with `prefix`, in key order."""
    cur = txn.cursor()
    if not cur.set_range(prefix):
        return
    for k, v in cur:
        if not k.startswith(prefix):
            return
        yield k, v


def _has_prefix(txn: lmdb.Transaction[bytes], prefix: bytes) -> bool:
    cur = txn.cursor()
    return cur.set_range(prefix) and cur.key().startswith(prefix)


def _decode_verified(value: bytes, size: int) -> FileDigests:
    """The digests of a V value (whose version prefix the caller has matched)."""
    at = _VERIFIED_VERSION.size
    kind, flags, _hashed_at = _VERIFIED.unpack_from(value, at + 32)
    rest = value[at + 32 + _VERIFIED.size :]
    sha256 = rest[:32] if flags & _FLAG_SHA256 else None
    md5 = rest[32 if sha256 else 0 :][:16] if flags & _FLAG_MD5 else None
    blake = value[at : at + 32]
    return FileDigests(blake3=blake, size=size, kind=FileKind(kind), sha256=sha256, md5=md5)


def _merge_digests(old: FileDigests, new: FileDigests) -> FileDigests:
    if old.blake3 != new.blake3:
        return new
    return FileDigests(
        blake3=new.blake3,
        size=new.size,
        kind=new.kind,
        sha256=new.sha256 or old.sha256,
        md5=new.md5 or old.md5,
    )


def _matching_keys(txn: lmdb.Transaction[bytes], path: str, *, recursive: bool) -> list[bytes]:
    """EKs recorded at `path` (and, with recursive, below it)."""
    exact = _ENTRIES + path_key(path) + b"\0"
    keys = [k[1:] for k, _v in _scan(txn, exact) if len(k) == len(exact) + 4]
    if recursive:
        below = os.fsencode(path.rstrip("/") + "/")
        for k, v in _scan(txn, _ENTRIES + below[:_LONG_PATH_PREFIX]):
            if os.fsencode(_decode_entry(v)[2]).startswith(below):
                keys.append(k[1:])
    return keys


def _entry_digests(entry: TrustEntry) -> FileDigests:
    # md5: the deb importer asks the cache for it (dpkg records only MD5); see TrustEntry.md5.
    return FileDigests(
        blake3=entry.digest, size=entry.size, kind=entry.kind, sha256=entry.sha256, md5=entry.md5
    )


def _read_generation(txn: lmdb.Transaction[bytes]) -> int:
    raw = txn.get(_META + b"generation")
    return int(_U64LE.unpack(raw)[0]) if raw else 0


def _changes_key(generation: int) -> bytes:
    return _CHANGES + struct.pack(">Q", generation)


def _encode_changes(
    paths: set[bytes], removed: set[bytes], added: set[bytes], *, everything: bool = False
) -> bytes:
    if everything or len(paths) > MAX_LOGGED_PATHS:
        return _CHANGE_HEAD.pack(_ALL_CHANGED, 0, 0)
    head = _CHANGE_HEAD.pack(len(paths), len(removed), len(added))
    return head + b"".join(sorted(removed)) + b"".join(sorted(added)) + b"\0".join(sorted(paths))


def _decode_changes(value: bytes) -> tuple[list[bytes], list[bytes], list[bytes]] | None:
    """-> (paths, removed digests, added digests), or None for "everything changed"."""
    npaths, nremoved, nadded = _CHANGE_HEAD.unpack_from(value)
    if npaths == _ALL_CHANGED:
        return None
    at = _CHANGE_HEAD.size
    removed = [value[at + 32 * i : at + 32 * i + 32] for i in range(nremoved)]
    at += 32 * nremoved
    added = [value[at + 32 * i : at + 32 * i + 32] for i in range(nadded)]
    at += 32 * nadded
    paths = value[at:].split(b"\0") if npaths else []
    return paths, removed, added


def _part_key(sid: int, name: str) -> bytes:
    return _PARTS + _U32.pack(sid) + name.encode()


RememberedSkip = tuple[bytes, str, bool, InodeKey]
"""(raw path, reason, fatal, inode key when judged) of one skip a part remembers."""


def _encode_part(
    fingerprint: bytes,
    files: int,
    not_executable: int,
    recorded: list[tuple[bytes, int, InodeKey]],
    skipped: list[RememberedSkip] = [],  # noqa: B006  read only
) -> bytes:
    """recorded: (raw path, size, inode key) of every entry of the part; skipped: its skips."""
    out = [fingerprint, _PART_HEAD.pack(files, not_executable, len(recorded))]
    for raw, size, key in recorded:
        out.append(_PART_FILE.pack(key.dev, key.ino, key.ctime_sec, key.ctime_nsec, size, len(raw)))
        out.append(raw)
    if skipped:
        out.append(_U32.pack(len(skipped)))
        for raw, reason, fatal, key in skipped:
            text = reason.encode()
            out.append(_PART_SKIP.pack(*key, fatal, len(raw), len(text)))
            out += (raw, text)
    return b"".join(out)


def _decode_part(
    value: bytes,
) -> tuple[bytes, int, int, list[tuple[bytes, int, InodeKey]], list[RememberedSkip]]:
    files, not_exec, n = _PART_HEAD.unpack_from(value, 32)
    at = 32 + _PART_HEAD.size
    recorded = []
    for _ in range(n):
        dev, ino, sec, nsec, size, plen = _PART_FILE.unpack_from(value, at)
        at += _PART_FILE.size
        recorded.append((value[at : at + plen], size, InodeKey(dev, ino, sec, nsec)))
        at += plen
    skipped: list[RememberedSkip] = []
    if at < len(value):  # records written before skips were remembered end here
        (m,) = _U32.unpack_from(value, at)
        at += _U32.size
        for _ in range(m):
            dev, ino, sec, nsec, fatal, plen, rlen = _PART_SKIP.unpack_from(value, at)
            at += _PART_SKIP.size
            raw, reason = value[at : at + plen], value[at + plen : at + plen + rlen].decode()
            skipped.append((raw, reason, bool(fatal), InodeKey(dev, ino, sec, nsec)))
            at += plen + rlen
    return value[:32], files, not_exec, recorded, skipped
