"""The trust database: stores and looks up, decides nothing (Santa's SNTRuleTable).

The on-disk format (SCHEMA), with the rules for transactions, writers and the generation, is
described in `trustdb.dbschema`; the bookkeeping of one write transaction is `trustdb.dbwrite`.
This module is the public face: `TrustDB`, its records and its errors.
"""

from __future__ import annotations

import errno
import os
import re
import time
from collections import Counter
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager, suppress
from pathlib import Path
from typing import Self, TypeVar

import lmdb

from trustdb.dbenv import Replayable, map_size_for, translate, writer_lock
from trustdb.dbrecords import (
    BusyError,
    ContentRecord,
    DatabaseError,
    DatabaseStatus,
    DiskFullError,
    PathRecord,
    SchemaError,
    SourceRecord,
    WriteStats,
)
from trustdb.dbschema import (
    _BY_DIGEST,
    _BY_SOURCE,
    _CONTENT,
    _CONTENT_T,
    _ENTRIES,
    _ENTRY,
    _FLAG_SHA256,
    _META,
    _SOURCE,
    _SOURCE_IDS,
    _SOURCES,
    _U32,
    _U64LE,
    _VERIFIED_T,
    SCHEMA_VERSION,
    _decode_entry,
    _has_prefix,
    _matching_keys,
    _read_generation,
    _scan,
)
from trustdb.dbview import DigestCacheView, MirrorSnapshot
from trustdb.dbwrite import Items, _Txn, received
from trustdb.model import FileDigests, FileKind, InodeKey, SkippedEntry, StreamItem

__all__ = ["DEFAULT_DB", "ItemSource", "TrustDB"]
"""Records and errors live in `trustdb.dbrecords`, the format in `trustdb.dbschema`."""

DEFAULT_DB = Path("/var/lib/trustdb")

R = TypeVar("R")

ItemSource = Items | Callable[[], Items]
"""What a source write consumes: the items, or a function that produces them afresh."""


class TrustDB:
    """One LMDB environment.

    Usage: `with TrustDB.open(path, write=True) as db: db.replace_source(...)`.
    Readers never block on a writer; every write method is exactly one transaction.
    """

    def __init__(
        self, path: Path, env: lmdb.Environment, *, write: bool, busy_timeout: float
    ) -> None:
        self.path = path
        self._env = env
        self._write = write
        self._busy_timeout = busy_timeout
        self.last_skipped: list[SkippedEntry] = []
        """SkippedEntry values met by the last write call, for the caller to report."""

    @classmethod
    def open(
        cls,
        path: Path,
        *,
        write: bool = False,
        busy_timeout: float = 0.0,
        map_size: int | None = None,
    ) -> TrustDB:
        """Open (with write=True: create) the database in directory `path`. Never waits for
        a running writer: a second writer fails at its first write (BusyError).

        Raises SchemaError for a database of a newer schema, DatabaseError when there is no
        database to read or it cannot be opened."""
        path = Path(path)
        if not write and not (path / "data.mdb").exists():
            raise DatabaseError(f"no trust database at {path} (create one with `trustdb trust`)")
        try:
            if write:
                path.mkdir(mode=0o755, parents=True, exist_ok=True)
            env = lmdb.open(
                str(path),
                map_size=map_size or map_size_for(path),
                max_dbs=0,
                readonly=not write,
                subdir=True,
                max_readers=256,
                create=write,
                # An unprivileged reader cannot write lock.mdb (mode 0644, root's): it reads
                # without registering in the reader table. Safe while at most one commit lands
                # during its read (a writer reuses only pages freed two commits ago).
                lock=write or os.access(path / "lock.mdb", os.W_OK)
                or not (path / "lock.mdb").exists(),
            )
        except lmdb.Error as e:
            raise translate(e, path) from e
        except OSError as e:
            if e.errno == errno.ENOSPC:
                raise DiskFullError(f"disk full creating {path}") from e
            raise DatabaseError(f"cannot open {path}: {e.strerror}") from e
        if write:
            env.reader_check()  # free reader slots of killed processes: they pin old pages
        db = cls(path, env, write=write, busy_timeout=busy_timeout)
        try:
            db._check_schema()
        except BaseException:
            env.close()
            raise
        return db

    def _check_schema(self) -> None:
        with self._read() as txn:
            raw = txn.get(_META + b"schema")
            empty = not _has_prefix(txn, b"")
        if raw is None and not (self._write and empty):
            raise DatabaseError(f"{self.path} is not a trust database (no schema version)")
        if raw is None:
            # A new database: stamp the schema now, so readers can open it at once.
            with suppress(BusyError):  # someone else is creating it at this very moment
                self._run_write(lambda t: None, bump=False)
        if raw is not None and _U32.unpack(raw)[0] > SCHEMA_VERSION:
            raise SchemaError(
                f"database {self.path} has schema {_U32.unpack(raw)[0]}, newer than this "
                f"trustdb understands ({SCHEMA_VERSION}); upgrade trustdb"
            )

    def close(self) -> None:
        self._env.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # --- writes (one transaction each) ---
    def replace_source(self, label: str, kind: str, items: ItemSource) -> WriteStats:
        """Make the source's entries exactly `items` (TrustEntry only; SkippedEntry values are
        passed through to `last_skipped` for reporting). Content no longer trusted by any source
        disappears in the same transaction. Writes nothing (same generation) if nothing changed.
        Caches each entry's `inode` verification (see `digest_cache`).

        `items` is consumed inside the transaction (a generator that hashes as it goes keeps
        the writer lock meanwhile). A retry after growing the map needs the items again: pass
        a function returning a fresh iterable (memory stays bounded whatever the size), or an
        iterable, which is then recorded as it is consumed."""
        return self._put_entries(label, kind, items, replace=True)

    def add_entries(self, label: str, kind: str, entries: ItemSource) -> WriteStats:
        """Add or update entries of a source without removing others (`trustdb trust`).
        Like replace_source, SkippedEntry values go to `last_skipped`."""
        return self._put_entries(label, kind, entries, replace=False)

    def _put_entries(
        self, label: str, kind: str, items: ItemSource, *, replace: bool
    ) -> WriteStats:
        # A retry (the map grew) needs the stream again: a callable is asked for a fresh one
        # (memory stays flat); a plain iterable is recorded as it is consumed.
        if callable(items):
            produce: Callable[[], Iterable[tuple[StreamItem, float]]] = (
                lambda: received(items())  # type: ignore[operator]
            )
        else:
            replay = Replayable(received(items))
            produce = replay.__iter__

        def body(t: _Txn) -> tuple[int, int, int]:
            sid = t.source_id(label, kind, create=True)
            assert sid is not None
            added, removed, unchanged, new, skipped = t.put_entries(
                sid, produce(), replace=replace
            )
            self.last_skipped = skipped
            if t.changed:
                t.adjust_source(label, kind, new - removed)
            return added, removed, unchanged

        (added, removed, unchanged), gen = self._run_write(body)
        return WriteStats(added=added, removed=removed, unchanged=unchanged, generation=gen)

    def remove_paths(
        self, paths: Iterable[str], label: str | None = None, *, recursive: bool = False
    ) -> WriteStats:
        """Untrust paths (of one source, or of all). With recursive, a path also removes
        everything recorded below it (`trustdb untrust DIR`). Emptied sources are dropped."""
        wanted = list(paths)

        def body(t: _Txn) -> int:
            only = t.source_id(label, "", create=False) if label is not None else None
            if label is not None and only is None:
                return 0
            per_source: Counter[bytes] = Counter()
            for path in wanted:
                for ek in _matching_keys(t.txn, path, recursive=recursive):
                    if (only is None or ek[-4:] == _U32.pack(only)) and t.delete_entry(ek):
                        per_source[ek[-4:]] += 1
            for sid, count in per_source.items():
                t.drop_parts(_U32.unpack(sid)[0])  # an import must not keep what was removed
                src = t.txn.get(_SOURCE_IDS + sid)
                if src is not None:
                    t.adjust_source(src.decode(), None, -count, drop_if_empty=True)
            return sum(per_source.values())

        removed, gen = self._run_write(body)
        return WriteStats(added=0, removed=removed, unchanged=0, generation=gen)

    def remove_source(self, label: str) -> WriteStats:
        """Untrust everything a source vouches for, and forget the source."""

        def body(t: _Txn) -> int:
            sid = t.source_id(label, "", create=False)
            if sid is None:
                raise DatabaseError(f"no source named {label!r}")
            keys = t.source_entry_keys(sid)
            for ek in keys:
                t.delete_entry(ek)
            t.drop_parts(sid)
            t.drop_source(label, sid)
            return len(keys)

        removed, gen = self._run_write(body)
        return WriteStats(added=0, removed=removed, unchanged=0, generation=gen)

    def record_verification(self, key: InodeKey, digests: FileDigests) -> None:
        """Cache the verification of one on-disk file (used by the mirror).

        The caller just hashed the file: a ctime this close to now is not cached (see
        FRESH_CTIME_SECONDS). Skipped silently when another writer holds the database."""
        self.record_verifications([(key, digests)])

    def record_verifications(self, items: Iterable[tuple[InodeKey, FileDigests]]) -> None:
        """Many `record_verification`s in one transaction."""
        batch = list(items)
        now = time.time()

        def body(t: _Txn) -> None:
            for key, digests in batch:
                t.cache(key, digests, now)

        try:
            self._run_write(body, bump=False)
        except BusyError:
            pass  # a cache write is never worth failing for

    def _run_write(self, body: Callable[[_Txn], R], *, bump: bool = True) -> tuple[R, int]:
        """Run `body` in one write transaction under the writer lock; retry it on a full map.
        -> (body's result, generation after)."""
        if not self._write:
            raise DatabaseError(f"database {self.path} was opened read-only")
        with writer_lock(self.path, self._busy_timeout):
            while True:
                try:
                    return self._attempt(body, bump=bump)
                except lmdb.MapFullError:
                    self._grow()
                except lmdb.MapResizedError:
                    self._env.set_mapsize(0)  # another process grew the map: adopt its size
                except lmdb.Error as e:
                    raise translate(e, self.path) from e

    def _attempt(self, body: Callable[[_Txn], R], *, bump: bool) -> tuple[R, int]:
        txn = self._env.begin(write=True)
        try:
            t = _Txn(txn)
            stamped = txn.get(_META + b"schema")
            if stamped is None or _U32.unpack(stamped)[0] < SCHEMA_VERSION:
                txn.put(_META + b"schema", _U32.pack(SCHEMA_VERSION))  # see SCHEMA: Versions
            result = body(t)
            gen = _read_generation(txn)
            if t.changed and bump:
                gen += 1
                txn.put(_META + b"generation", _U64LE.pack(gen))
                t.write_change_record(gen)
            txn.commit()
            return result, gen
        except BaseException:
            txn.abort()
            raise

    def _grow(self) -> None:
        size = self._env.info()["map_size"] * 4
        self._env.set_mapsize(size)

    # --- reads ---
    def _begin_read(self) -> lmdb.Transaction[bytes]:
        try:
            return self._env.begin()
        except lmdb.MapResizedError:
            # Another process grew the map: adopt its size and start again.
            self._env.set_mapsize(0)
            return self._env.begin()

    @contextmanager
    def _read(self) -> Iterator[lmdb.Transaction[bytes]]:
        txn = self._begin_read()
        try:
            yield txn
        finally:
            txn.abort()

    def snapshot(self) -> MirrorSnapshot:
        """One read transaction over what a mirror sync reads (see `trustdb.dbview`)."""
        return MirrorSnapshot(self._begin_read())

    @property
    def generation(self) -> int:
        with self._read() as txn:
            return _read_generation(txn)

    def is_trusted(self, digest: bytes) -> bool:
        with self._read() as txn:
            return txn.get(_CONTENT_T + digest) is not None

    def content(self, digest: bytes) -> ContentRecord | None:
        """The content record of a digest, if any source trusts it."""
        with self._read() as txn:
            raw = txn.get(_CONTENT_T + digest)
        if raw is None:
            return None
        size, kind, flags, first, last = _CONTENT.unpack_from(raw)
        return ContentRecord(
            digest=digest,
            size=size,
            kind=FileKind(kind),
            first_trusted=first,
            last_trusted=last,
            sha256=raw[_CONTENT.size :] if flags & _FLAG_SHA256 else None,
        )

    def trusted_by(self, digest: bytes) -> list[PathRecord]:
        """Every (source, path) that vouches for this content."""
        prefix = _BY_DIGEST + digest
        with self._read() as txn:
            return [self._record(txn, k[len(prefix) :]) for k, _v in _scan(txn, prefix)]

    def records_for_path(self, path: str) -> list[PathRecord]:
        with self._read() as txn:
            return [self._record(txn, ek) for ek in _matching_keys(txn, path, recursive=False)]

    def iter_paths(self, label: str | None = None) -> Iterator[PathRecord]:
        """Every recorded (path, source) fact, sorted by path (the mirror walks this)."""
        with self._read() as txn:
            if label is None:
                for k, v in _scan(txn, _ENTRIES):
                    yield self._record(txn, k[1:], v)
                return
            raw = txn.get(_SOURCES + label.encode())
            if raw is None:
                return
            prefix = _BY_SOURCE + _U32.pack(_SOURCE.unpack_from(raw)[0])
            for k, _v in _scan(txn, prefix):
                yield self._record(txn, k[len(prefix) :])

    def paths_named(self, named: re.Pattern[str]) -> list[tuple[str, bytes]]:
        """(path, digest) of every recorded fact whose basename `named` matches: one pass over
        the entries that decodes only their basenames (`run` looks for interpreters so)."""
        out = []
        with self._read() as txn:
            for _k, v in _scan(txn, _ENTRIES):
                start = 32 + _ENTRY.size  # the layout `_decode_entry` reads
                raw = v[start : start + _ENTRY.unpack_from(v, 32)[1]]
                if named.match(os.fsdecode(raw.rpartition(b"/")[2])):
                    out.append((os.fsdecode(raw), v[:32]))
        return out

    def _record(
        self, txn: lmdb.Transaction[bytes], ek: bytes, value: bytes | None = None
    ) -> PathRecord:
        if value is None:
            value = txn.get(_ENTRIES + ek)
            if value is None:
                raise DatabaseError(f"database {self.path} is inconsistent (dangling index)")
        digest, trusted_at, path, origin = _decode_entry(value)
        raw_label = txn.get(_SOURCE_IDS + ek[-4:])
        label = raw_label.decode() if raw_label is not None else f"#{_U32.unpack(ek[-4:])[0]}"
        return PathRecord(
            path=path, label=label, digest=digest, origin=origin, trusted_at=trusted_at
        )

    def sources(self) -> list[SourceRecord]:
        with self._read() as txn:
            out = []
            for k, v in _scan(txn, _SOURCES):
                _sid, count, updated = _SOURCE.unpack_from(v)
                kind = v[_SOURCE.size :].decode()
                out.append(SourceRecord(k[1:].decode(), kind, count, updated))
            return out

    def entry_count(self) -> int:
        """How many (path, source) facts there are, from the sources' counters (no scan)."""
        with self._read() as txn:
            return sum(_SOURCE.unpack_from(v)[1] for _k, v in _scan(txn, _SOURCES))

    def status(self) -> DatabaseStatus:
        with self._read() as txn:
            counts = {
                t: sum(1 for _ in _scan(txn, t))
                for t in (_ENTRIES, _CONTENT_T, _SOURCES, _VERIFIED_T)
            }
            raw = txn.get(_META + b"schema")
            schema = _U32.unpack(raw)[0] if raw else 0
            gen = _read_generation(txn)
        on_disk = 0
        for name in ("data.mdb", "lock.mdb"):
            try:
                on_disk += os.stat(self.path / name).st_blocks * 512
            except FileNotFoundError:
                pass
        return DatabaseStatus(
            path=str(self.path),
            schema=schema,
            generation=gen,
            entries=counts[_ENTRIES],
            contents=counts[_CONTENT_T],
            sources=counts[_SOURCES],
            cached_verifications=counts[_VERIFIED_T],
            size_on_disk=on_disk,
            map_size=self._env.info()["map_size"],
        )

    def digest_cache(self) -> DigestCacheView:
        """A read-only `trustdb_importers.interface.DigestCache` over cached verifications."""
        return DigestCacheView(self._read)
