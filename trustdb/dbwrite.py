"""The write side of the trust database: one LMDB write transaction's bookkeeping (see the
schema in `trustdb.dbschema`). `trustdb.db.TrustDB` runs these under its writer lock."""

from __future__ import annotations

import os
import sys
import time
from collections.abc import Callable, Iterable, Iterator

import lmdb

from trustdb.dbschema import (
    _BY_DIGEST,
    _BY_SOURCE,
    _CONTENT,
    _CONTENT_T,
    _ENTRIES,
    _ENTRY,
    _FLAG_MD5,
    _FLAG_SHA256,
    _MAX_DIRECT_PATH_KEY,
    _META,
    _PARTS,
    _SOURCE,
    _SOURCE_IDS,
    _SOURCES,
    _U32,
    _VERIFIED,
    _VERIFIED_KEY,
    _VERIFIED_T,
    _VERIFIED_VERSION,
    CHANGE_LOG_KEEP,
    RememberedSkip,
    MAX_LOGGED_PATHS,
    _changes_key,
    _decode_part,
    _decode_verified,
    _encode_changes,
    _encode_part,
    _entry_digests,
    _has_prefix,
    _merge_digests,
    _part_key,
    _scan,
    _verified_key,
    _verified_version,
    path_key,
)
from trustdb.hashing import FRESH_CTIME_SECONDS
from trustdb.model import (
    FileDigests,
    InodeKey,
    KeptPart,
    PartDone,
    SkippedEntry,
    StreamItem,
    TrustEntry,
)

_ENTRY_PATH_AT = 32 + _ENTRY.size

Items = Iterable[StreamItem]


def received(items: Items) -> Iterator[tuple[StreamItem, float]]:
    """Pair each item with the time it arrived: the arrival time bounds the hash time."""
    clock = time.time
    for item in items:
        yield item, clock()


class _Txn:
    """The write operations of one transaction (all the bookkeeping of SCHEMA lives here)."""

    def __init__(self, txn: lmdb.Transaction[bytes]) -> None:
        self.txn = txn
        self.now = time.time()
        self.changed = False
        # The change record of this commit (SCHEMA: L), bounded: past MAX_LOGGED_PATHS the
        # record says "everything" and stops collecting.
        self.changed_paths: set[bytes] = set()
        self.all_changed = False
        self.removed_digests: set[bytes] = set()
        self.added_digests: set[bytes] = set()

    def note_path(self, raw_path: bytes) -> None:
        if self.all_changed:
            return
        self.changed_paths.add(raw_path)
        if len(self.changed_paths) > MAX_LOGGED_PATHS:
            # "Everything" needs no lists: memory stays bounded on any size of write.
            self.all_changed = True
            self.changed_paths = set()
            self.removed_digests = set()
            self.added_digests = set()

    def note_digest(self, digest: bytes, *, added: bool) -> None:
        if self.all_changed:
            return
        (self.added_digests if added else self.removed_digests).add(digest)
        (self.removed_digests if added else self.added_digests).discard(digest)

    # --- sources ---
    def source_id(self, label: str, kind: str, *, create: bool) -> int | None:
        raw = self.txn.get(_SOURCES + label.encode())
        if raw is not None:
            return int(_SOURCE.unpack_from(raw)[0])
        if not create:
            return None
        next_raw = self.txn.get(_META + b"next_sid")
        sid = _U32.unpack(next_raw)[0] if next_raw else 1
        self.txn.put(_META + b"next_sid", _U32.pack(sid + 1))
        self.txn.put(_SOURCE_IDS + _U32.pack(sid), label.encode())
        self.txn.put(_SOURCES + label.encode(), _SOURCE.pack(sid, 0, self.now) + kind.encode())
        self.changed = True
        return sid

    def adjust_source(
        self, label: str, kind: str | None, delta: int, *, drop_if_empty: bool = False
    ) -> None:
        key = _SOURCES + label.encode()
        raw = self.txn.get(key)
        if raw is None:
            return
        sid, count, _updated = _SOURCE.unpack_from(raw)
        count += delta
        if count <= 0 and drop_if_empty:
            self.drop_source(label, sid)
            return
        kind = kind or raw[_SOURCE.size :].decode()
        self.txn.put(key, _SOURCE.pack(sid, max(count, 0), self.now) + kind.encode())

    def drop_source(self, label: str, sid: int) -> None:
        self.txn.delete(_SOURCES + label.encode())
        self.txn.delete(_SOURCE_IDS + _U32.pack(sid))
        self.changed = True

    # --- entries and content ---
    def put_entries(
        self, sid: int, stream: Iterable[tuple[StreamItem, float]], *, replace: bool
    ) -> tuple[int, int, int, int, list[SkippedEntry]]:
        """Record a stream of (item, time received) for source `sid` (see TrustDB.add_entries).
        -> (added, removed, unchanged, new, skipped): new counts facts that did not exist.

        The loop runs once per file of an import or a trust, and there the main process is the
        limit (profiled: trust of /usr/lib, 68k files: the workers idle while it writes). So a
        new fact, the common case, is written inline, with what it calls bound to locals:
        what `put_entry`, `touch_content`, `note_path`, `note_digest` and `cache_entry` do, in
        the same order and with the same bytes; anything else goes through those methods."""
        sid_raw = _U32.pack(sid)
        old_keys = set(self.source_entry_keys(sid)) if replace else set()
        discard = old_keys.discard
        skipped: list[SkippedEntry] = []
        part: list[tuple[bytes, int, InodeKey]] | None = []
        part_skips: list[RememberedSkip] = []
        parts_seen: set[bytes] = set()
        added = unchanged = new = 0
        txn = self.txn
        get, put = txn.get, txn.put
        pack_entry, pack_content = _ENTRY.pack, _CONTENT.pack
        pack_vkey, pack_version = _VERIFIED_KEY.pack, _VERIFIED_VERSION.pack
        now = self.now
        entry_type = TrustEntry
        fs_encoding, fs_errors = sys.getfilesystemencoding(), sys.getfilesystemencodeerrors()
        for item, received in stream:
            if type(item) is not entry_type:
                part, part_skips, unchanged = self._other_item(
                    item, sid, sid_raw, discard, skipped, part, part_skips, parts_seen, unchanged
                )
                continue
            path = item.path
            raw = path.encode(fs_encoding, fs_errors)  # os.fsencode, without its call
            ek = (raw if len(raw) <= _MAX_DIRECT_PATH_KEY else path_key(path)) + b"\0" + sid_raw
            digest = item.digest
            entry_key = _ENTRIES + ek
            old = get(entry_key)
            if old is not None or item.sha256 is not None:
                written, is_new = self.put_entry(sid_raw, ek, raw, item)
                added += written
                unchanged += not written
                new += is_new
            else:
                # put_entry of a new fact (without SHA-256: that is touch_content's merge)
                put(_BY_SOURCE + sid_raw + ek, b"")
                put(entry_key, digest + pack_entry(now, len(raw)) + raw + item.origin.encode())
                put(_BY_DIGEST + digest + ek, b"")
                content_key = _CONTENT_T + digest
                known = get(content_key)
                if known is None:
                    first = now
                    if not self.all_changed:
                        self.added_digests.add(digest)
                        self.removed_digests.discard(digest)
                else:
                    first = _CONTENT.unpack_from(known)[3]
                size = item.size
                if known is not None and len(known) > _CONTENT.size:
                    put(content_key, pack_content(size, item.kind, _FLAG_SHA256, first, now)
                        + known[_CONTENT.size :])
                else:
                    put(content_key, pack_content(size, item.kind, 0, first, now))
                self.note_path(raw)
                added += 1
                new += 1
            if old_keys:
                discard(ek)
            inode = item.inode
            if inode is None:
                part = None
                continue
            if part is not None:
                part.append((raw, item.size, inode))
            # cache_entry, inline for the case of no cached verification
            vk = _VERIFIED_T + pack_vkey(inode.dev, inode.ino)
            cached = get(vk)
            if cached is not None:
                self.cache_entry(item, received)
            elif received - (inode.ctime_sec + inode.ctime_nsec / 1e9) >= FRESH_CTIME_SECONDS:
                version = pack_version(inode.ctime_sec, inode.ctime_nsec, item.size)
                put(vk, _verified_value(
                    version, digest, item.kind, item.sha256, item.md5, received))
        self.changed = self.changed or added > 0
        for ek in sorted(old_keys):
            self.delete_entry(ek)
        if replace:
            self.drop_parts(sid, keep=parts_seen)
        return added, len(old_keys), unchanged, new, skipped

    def _other_item(
        self,
        item: StreamItem,
        sid: int,
        sid_raw: bytes,
        discard: Callable[[bytes], None],
        skipped: list[SkippedEntry],
        part: list[tuple[bytes, int, InodeKey]] | None,
        part_skips: list[RememberedSkip],
        parts_seen: set[bytes],
        unchanged: int,
    ) -> tuple[list[tuple[bytes, int, InodeKey]] | None, list[RememberedSkip], int]:
        """put_entries for a skip or a part's end. -> (part, part_skips, unchanged) after it."""
        if isinstance(item, SkippedEntry):
            skipped.append(item)
            if item.seen is None:
                part = None  # a part with a passing problem is verified again next time
            else:
                part_skips.append((os.fsencode(item.path), item.reason, item.fatal, item.seen))
            return part, part_skips, unchanged
        assert isinstance(item, (PartDone, KeptPart))
        key = _part_key(sid, item.name)
        parts_seen.add(key)
        if isinstance(item, KeptPart):
            unchanged += self.keep_part(key, sid_raw, discard)
        else:
            self.write_part(key, item, part, part_skips)
        return [], [], unchanged

    # --- parts (SCHEMA: P) ---
    def keep_part(self, key: bytes, sid_raw: bytes, discard: Callable[[bytes], None]) -> int:
        """The importer found the part unchanged: its recorded entries stay. -> how many."""
        raw = self.txn.get(key)
        if raw is None:
            return 0
        recorded = _decode_part(raw)[3]  # its remembered skips came again in the stream
        for path, _size, _key in recorded:
            pk = path if len(path) <= _MAX_DIRECT_PATH_KEY else path_key(os.fsdecode(path))
            discard(pk + b"\0" + sid_raw)
        return len(recorded)

    def write_part(
        self,
        key: bytes,
        done: PartDone,
        recorded: list[tuple[bytes, int, InodeKey]] | None,
        skips: list[RememberedSkip],
    ) -> None:
        if done.fingerprint is None or recorded is None:
            self.txn.delete(key)
            return
        value = _encode_part(done.fingerprint, done.files, done.not_executable, recorded, skips)
        if self.txn.get(key) != value:
            self.txn.put(key, value)

    def drop_parts(self, sid: int, *, keep: set[bytes] = frozenset()) -> None:  # type: ignore[assignment]
        """Forget the source's part records (all, or those not in `keep`)."""
        stale = [k for k, _v in _scan(self.txn, _PARTS + _U32.pack(sid)) if k not in keep]
        for k in stale:
            self.txn.delete(k)

    def put_entry(
        self, sid_raw: bytes, ek: bytes, raw_path: bytes, entry: TrustEntry
    ) -> tuple[bool, bool]:
        """Record one fact. -> (written, new): written if the fact changed, new if it is new."""
        txn = self.txn
        old = txn.get(_ENTRIES + ek)
        origin = entry.origin.encode()
        if old is not None:
            old_digest = old[:32]
            if old_digest == entry.digest and old[_ENTRY_PATH_AT + len(raw_path) :] == origin:
                return False, False
            if old_digest != entry.digest:
                self.unlink_digest(old_digest, ek)
        else:
            txn.put(_BY_SOURCE + sid_raw + ek, b"")
        txn.put(
            _ENTRIES + ek,
            entry.digest + _ENTRY.pack(self.now, len(raw_path)) + raw_path + origin,
        )
        if old is None or old[:32] != entry.digest:
            txn.put(_BY_DIGEST + entry.digest + ek, b"")
            self.touch_content(entry)
            self.note_path(raw_path)
        self.changed = True
        return True, old is None

    def touch_content(self, entry: TrustEntry) -> None:
        key = _CONTENT_T + entry.digest
        raw = self.txn.get(key)
        first = self.now
        sha256 = entry.sha256
        if raw is None:
            self.note_digest(entry.digest, added=True)
        else:
            first = _CONTENT.unpack_from(raw)[3]
            if sha256 is None and len(raw) > _CONTENT.size:
                sha256 = raw[_CONTENT.size :]
        flags = _FLAG_SHA256 if sha256 else 0
        value = _CONTENT.pack(entry.size, int(entry.kind), flags, first, self.now)
        self.txn.put(key, value + (sha256 or b""))

    def unlink_digest(self, digest: bytes, ek: bytes) -> None:
        """Forget that entry `ek` names `digest`; drop the content if nobody else does."""
        self.txn.delete(_BY_DIGEST + digest + ek)
        if not _has_prefix(self.txn, _BY_DIGEST + digest):
            self.txn.delete(_CONTENT_T + digest)
            self.note_digest(digest, added=False)

    def delete_entry(self, ek: bytes) -> bool:
        raw = self.txn.pop(_ENTRIES + ek)
        if raw is None:
            return False
        self.unlink_digest(raw[:32], ek)
        self.txn.delete(_BY_SOURCE + ek[-4:] + ek)
        plen = _ENTRY.unpack_from(raw, 32)[1]
        self.note_path(raw[_ENTRY_PATH_AT : _ENTRY_PATH_AT + plen])
        self.changed = True
        return True

    def write_change_record(self, generation: int) -> None:
        """SCHEMA: L. Called once per commit that bumps the generation."""
        value = _encode_changes(
            self.changed_paths,
            self.removed_digests,
            self.added_digests,
            everything=self.all_changed,
        )
        self.txn.put(_changes_key(generation), value)
        if generation > CHANGE_LOG_KEEP:
            self.txn.delete(_changes_key(generation - CHANGE_LOG_KEEP))

    def source_entry_keys(self, sid: int) -> list[bytes]:
        prefix = _BY_SOURCE + _U32.pack(sid)
        return [k[len(prefix) :] for k, _v in _scan(self.txn, prefix)]

    # --- verification cache ---
    def cache_entry(self, entry: TrustEntry, hashed_at: float) -> None:
        """Cache an entry's verification, unless the cache already knows all of it (the common
        case of a re-import, checked on the raw bytes: this runs once per entry)."""
        assert entry.inode is not None
        vk = _verified_key(entry.inode)
        version = _verified_version(entry.inode, entry.size)
        old = self.txn.get(vk)
        if old is None:
            # A first trust or import: nothing to merge, so no FileDigests (profiled: a fifth
            # of the write's cost per file went to building and comparing one).
            key = entry.inode
            if hashed_at - (key.ctime_sec + key.ctime_nsec / 1e9) >= FRESH_CTIME_SECONDS:
                value = _verified_value(
                    version, entry.digest, entry.kind, entry.sha256, entry.md5, hashed_at
                )
                self.txn.put(vk, value)
            return
        if old.startswith(version + entry.digest):
            have = old[len(version) + 33]  # the flags byte, after blake3 and kind
            need = (_FLAG_SHA256 if entry.sha256 else 0) | (_FLAG_MD5 if entry.md5 else 0)
            if not need & ~have:
                return
        self._cache(entry.inode, _entry_digests(entry), hashed_at, vk, old)

    def cache(self, key: InodeKey, digests: FileDigests, hashed_at: float) -> None:
        vk = _verified_key(key)
        self._cache(key, digests, hashed_at, vk, self.txn.get(vk))

    def _cache(
        self, key: InodeKey, digests: FileDigests, hashed_at: float, vk: bytes, old: bytes | None
    ) -> None:
        """Store a verification under `vk`, whose current value is `old`."""
        ctime = key.ctime_sec + key.ctime_nsec / 1e9
        if hashed_at - ctime < FRESH_CTIME_SECONDS:
            return  # see FRESH_CTIME_SECONDS
        version = _verified_version(key, digests.size)
        if old is not None and old.startswith(version):
            known = _decode_verified(old, digests.size)
            digests = _merge_digests(known, digests)
            if digests == known:
                return  # nothing new: an unchanged re-import writes no cache page
        value = _verified_value(
            version, digests.blake3, digests.kind, digests.sha256, digests.md5, hashed_at
        )
        if value != old:
            self.txn.put(vk, value)


def _verified_value(
    version: bytes,
    blake3: bytes,
    kind: int,
    sha256: bytes | None,
    md5: bytes | None,
    hashed_at: float,
) -> bytes:
    """SCHEMA: V's value, a verification of content `blake3` under inode version `version`."""
    flags = (_FLAG_SHA256 if sha256 else 0) | (_FLAG_MD5 if md5 else 0)
    return (
        version
        + blake3
        + _VERIFIED.pack(int(kind), flags, hashed_at)
        + (sha256 or b"")
        + (md5 or b"")
    )
