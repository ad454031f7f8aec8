"""The mirror: trust database -> kernel map of trusted inode keys (pipeline stage 3).

The database trusts *contents* (BLAKE3 digests); the kernel can only afford to look up *inodes*.
The mirror bridges the two: for every recorded path it proves that the inode now at that path
holds trusted content, and inserts that inode's `InodeKey` into a `KeySink` (the backend's map).

For one path (`Mirror.sync`):
  1. stat() the path (symlinks followed: the kernel sees the target); regular files only.
  2. Refuse filesystems whose stat() identity is not the inode the kernel hooks see (below).
  3. Coarse ctime: defer the file until the clock has left its ctime tick (below).
  4. Digest: the database's verification cache when (InodeKey, size) is cached, else hash the
     file (`hash_file` compares fstat before and after the read), then stat the path again and
     require the same inode, ctime, mtime and size as the fd that was read.
  5. Insert the key (batched) if that digest is trusted by any source (content, not path), and
     record the verification so a restart does not read an unchanged file again.

Decisions made here, each for a reason from /work/shared/KERNEL-NOTES.md:
- overlayfs is **resolved**: an exec sees the overlay inode (what stat() of the merged path
  reports) and a mapping sees the real inode in its layer, so both keys are inserted
  (`kernel_keys`, `overlay_real_stat`). Only the case proven on this kernel is resolved: all
  layers on one filesystem; any other overlay (layers on several filesystems, nested overlays)
  is **skipped with a reported reason**, as is btrfs, whose stat() reports a per-subvolume
  device that is not `i_sb->s_dev`. A file is never silently mis-keyed.
- coarse ctime (kernels < 6.13, or a filesystem without multigrain timestamps): a write in the
  same clock tick as our read keeps the old ctime, so the old key would still match modified
  content; and a file deleted and re-created in that tick can get the same inode number (ext4
  reuses it at once) and ctime, so the same key. A file is verified only once
  CLOCK_REALTIME_COARSE (the clock the kernel stamps ctime from) is past its ctime (past its
  timestamp granularity); any later write or re-created inode then gets another ctime. Files
  younger than that are deferred, and `sync` waits out the tick and verifies them afterwards.
  With multigrain timestamps (6.13+: ext4, xfs, btrfs, tmpfs) our stat() marks the ctime as
  seen, so the next change of that inode, unlink included, gets a newer fine-grained ctime and
  raises the floor of every later stamp: no wait is needed there.
- a key includes ctime, so chmod, link or rename of a trusted file makes the kernel miss: the
  first-seen path (trustdb.first_seen's fanotify handler, before the kernel decides; or
  `verify_file`, trustdb.mirrorfirstseen) re-hashes and inserts the new key when the content is
  still trusted.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterable, Sequence

from trustdb.backends.interface import KeySink, MapFullError
from trustdb.dbrecords import DatabaseError
from trustdb.dbview import ChangeSet
from trustdb.fskeys import (
    OVERLAYFS_SUPER_MAGIC,
    REASON_OVERLAY_UNRESOLVED,
    UNKEYABLE_FS,
    OverlayMount,
    coarse_now_ns,
    ctime_settled_at,
    fs_magic,
    kernel_has_multigrain,
    overlay_mounts,
    overlay_real_stat,
    wait_for_coarse_clock,
)
from trustdb.hashing import HashingError, hash_many
from trustdb.mirrorfirstseen import MAX_FIRST_SEEN, FirstSeenFiles
from trustdb.mirrorsource import (
    MirrorSource,
    MirrorStats,
    SkippedPath,
    SyncSnapshot,
    open_snapshot,
)
from trustdb.mirrorwalk import (
    REASON_CHANGED,
    REASON_NOT_REGULAR,
    REASON_UNSETTLED,
    REASON_UNTRUSTED,
    REASON_VANISHED,
    PathCheck,
    _Deferred,
    _Outcome,
    _ToHash,
    _Verified,
    _Walk,
)
from trustdb.model import FileDigests, InodeKey

MIN_MAP_ENTRIES = 1 << 14


class SyncCancelled(Exception):
    """`Mirror.cancel` stopped a sync: the keys it inserted so far stay (each was verified),
    nothing stale was removed yet."""


def map_size_for(entries: int) -> int:
    """Trusted-inode map size for a database of `entries` (path, source) facts: two keys per
    path (overlayfs files give two), plus the first-seen keys (MAX_FIRST_SEEN), rounded up to a
    power of two. A fixed size was either mostly empty or, past a million entries, too small."""
    needed = max(MIN_MAP_ENTRIES, 2 * entries + MAX_FIRST_SEEN)
    return 1 << (needed - 1).bit_length()




class Mirror(FirstSeenFiles):
    """Keeps a `KeySink` equal to "inodes whose current content the database trusts".

    Thread-safe for one `sync` (or `refresh`) at a time, running while another thread calls
    `verify_file`.
    """

    def __init__(
        self,
        db: MirrorSource,
        sink: KeySink,
        *,
        batch_size: int = 16384,
        multigrain: bool | None = None,
        max_first_seen_wait_ns: int = 20_000_000,
    ) -> None:
        """`multigrain`: force (True/False) whether ctime is fine-grained; None detects it from
        the kernel release and each file's filesystem. `max_first_seen_wait_ns`: how long
        `verify_file` may wait for a fresh file's ctime tick before giving up (it holds up an
        exec)."""
        self._db = db
        self._sink = sink
        self._batch = batch_size
        self._check = PathCheck(
            multigrain_kernel=kernel_has_multigrain() if multigrain is None else multigrain,
            detect_fs=multigrain is None,
        )
        self._first_seen_wait = max_first_seen_wait_ns
        self._lock = threading.Lock()
        self._keys: dict[InodeKey, bytes] = {}
        """Every key in the sink, with the digest it was trusted for."""
        self._first_seen: dict[InodeKey, bytes] = {}
        """Keys inserted by `verify_file` (copies, chmod'ed files): kept while still trusted."""
        self._unrecorded: list[tuple[InodeKey, FileDigests]] = []
        """Verifications made by `verify_file`, written to the database by the next refresh."""
        self._recent: dict[InodeKey, FileDigests] = {}
        """What `verify_file` read lately, trusted or not (bounded, oldest dropped first)."""
        self._generation: int | None = None
        self._walked = False
        """Whether a full sync ran since the sink was filled otherwise (`prime`, `adopt`):
        until then a refresh cannot know which keys a path gave, and syncs instead."""
        self._path_keys: dict[str, tuple[InodeKey, ...]] = {}
        """The keys each recorded path gave (a refresh takes them out when the path goes)."""
        self._key_refs: dict[InodeKey, int] = {}
        """How many recorded paths gave each key (hard links share one)."""
        self._untrusted: dict[bytes, set[str]] = {}
        """Recorded paths whose content on disk no source trusts, by that content's digest:
        a refresh verifies them again when the digest becomes trusted."""
        self._cancelled = False
        self.hash_count = 0
        self.overflow = 0
        """Keys left out because the kernel map was full, over this mirror's life."""
        """Files read and hashed over this mirror's life (tests and benchmarks use it)."""

    @property
    def keys(self) -> frozenset[InodeKey]:
        with self._lock:
            return frozenset(self._keys)

    def keys_for(self, digest: bytes) -> list[InodeKey]:
        """The mirrored keys whose trusted content is `digest` (a policy names a JIT by it)."""
        with self._lock:
            return [k for k, d in self._keys.items() if d == digest]

    # --- full and incremental sync ---

    def refresh(self) -> MirrorStats | None:
        """Follow the database. None when its generation has not moved (one read transaction;
        also writes the verifications `verify_file` queued, off the exec's critical path).
        Otherwise only what the commits since the last sync changed is applied (SCHEMA: L in
        trustdb.dbschema): the changed paths are verified again, and the keys of removed paths
        and of digests no source trusts any more are taken out, so a refresh costs in
        proportion to the change. A full `sync` when the change log does not reach back that
        far, or the source keeps none. Files that changed on disk without a database change are
        the first-seen path's business (`verify_file`), or the next full sync's."""
        if self._generation is None or not self._walked:
            return self.sync()
        snapshot = open_snapshot(self._db)
        if snapshot.generation == self._generation:
            snapshot.close()
            self._record(self._take_unrecorded())
            return None
        since = getattr(snapshot, "changes_since", None)
        changes: ChangeSet | None = since(self._generation) if since is not None else None
        if changes is None:
            snapshot.close()
            return self.sync()
        return self._apply(snapshot, changes)

    def _apply(self, snapshot: SyncSnapshot, changes: ChangeSet) -> MirrorStats:
        started = time.monotonic()
        try:
            walk = _Walk(snapshot)
            paths = set(changes.paths)
            for digest in changes.added:  # paths skipped as untrusted may hold it
                paths.update(self._untrusted.pop(digest, ()))
            gone: list[InodeKey] = []
            for path in sorted(paths):
                gone.extend(self._path_keys.pop(path, ()))
                recorded = snapshot.recorded(path)  # type: ignore[attr-defined]
                if recorded:
                    self._take(path, self._check.examine(path, recorded, walk), walk, recorded)
            self._hash_queued(walk)
            deferred_total = len(walk.deferred)
            self._retry_deferred(walk)
        finally:
            snapshot.close()
        self._flush(walk)
        self._adopt_paths(walk)
        removed = self._drop_changed(gone, changes.removed)
        self._record(walk.verifications + self._take_unrecorded())
        self._generation = changes.generation
        return self._stats(walk, changes.generation, len(paths), removed, deferred_total, started)

    def _adopt_paths(self, walk: _Walk) -> None:
        """Remember which keys each verified path gave, and which paths held untrusted content."""
        for keys in walk.path_keys.values():
            for k in keys:
                self._key_refs[k] = self._key_refs.get(k, 0) + 1
        self._path_keys.update(walk.path_keys)
        for digest, held in walk.untrusted.items():
            self._untrusted.setdefault(digest, set()).update(held)

    def _drop_changed(self, gone: list[InodeKey], untrusted: frozenset[bytes]) -> int:
        """Remove the keys of paths that went (unless another path, or the first-seen set,
        still holds them) and every key of content no longer trusted; returns how many."""
        with self._lock:
            drop: set[InodeKey] = set()
            for k in gone:  # the path let go of k (a path verified again holds it anew)
                refs = self._key_refs.get(k, 0) - 1
                if refs > 0:
                    self._key_refs[k] = refs
                    continue
                self._key_refs.pop(k, None)
                if k not in self._first_seen:
                    drop.add(k)
            if untrusted:  # one pass over the mirrored keys, only when trust was taken away
                drop.update(k for k, d in self._keys.items() if d in untrusted)
                for k in [k for k, d in self._first_seen.items() if d in untrusted]:
                    del self._first_seen[k]
            stale = [k for k in drop if k in self._keys]
            for start in range(0, len(stale), self._batch):
                self._sink.remove(stale[start : start + self._batch])
            for k in stale:
                del self._keys[k]
                self._key_refs.pop(k, None)
        return len(stale)

    def cancel(self) -> None:
        """Make a sync running on another thread stop soon (SyncCancelled): a `run` whose
        command ended does not wait for the walk that follows its attach."""
        self._cancelled = True

    def prime(self, devices: frozenset[int] | None = None) -> int:
        """Fill the sink from the verification cache alone, before any walk (no stat, no path):
        every cached inode version whose content some source trusts now. Returns how many keys
        went in. Sound for the same reason a cache hit is: the cache holds a version (inode,
        ctime, size) only once it was read unchanged and its ctime tick had passed, so any later
        change of that inode, or a new file on a reused inode number, has another key. What the
        cache cannot know (a recorded file changed since, overlayfs's second key) waits for the
        walk, or the first-seen handler meets it first. The next `sync` (a `refresh` runs one
        first) reconciles: it adds what the walk finds and removes the primed keys that no
        recorded path or first-seen file holds any more.
        `devices`: only keys of these devices (trustdb.system_trees.system_devices). The cache
        remembers keys of every device it met, one unmounted since among them, and a user can
        put a FUSE mount or an image of their own at a reused device number, serving other
        bytes at the cached inode and ctime; the walk only ever inserts keys of files it
        stats now, and the first-seen handler hashes what it lets in."""
        snapshot = open_snapshot(self._db)
        try:
            cached = getattr(snapshot, "trusted_cached_keys", None)
            if cached is None:  # a source with no verification cache to read
                return 0
            found = cached()
        finally:
            snapshot.close()
        if devices is not None:
            found = {k: d for k, d in found.items() if k.dev in devices}
        with self._lock:
            new = [k for k in found if k not in self._keys]
            inserted = 0
            for start in range(0, len(new), self._batch):
                inserted += self._insert(new[start : start + self._batch], found)
        return inserted

    def adopt(self, generation: int, keys: Iterable[InodeKey]) -> None:
        """Take over a sink an earlier mirror filled at `generation` (the service's pinned map,
        after a restart): its keys count as this mirror's, so nothing is inserted twice. The
        next `refresh` is a full `sync`: which path gave which key is not in the map, and
        without it a path untrusted since (or later) would keep its key. The sync writes only
        the difference and drops every adopted key no recorded path holds."""
        with self._lock:
            for k in keys:
                self._keys.setdefault(k, b"")
            self._generation = generation
            self._walked = False

    @property
    def sink(self) -> KeySink:
        return self._sink

    @property
    def generation(self) -> int | None:
        """The database generation the sink matches (None before the first sync)."""
        return self._generation

    def _take_unrecorded(self) -> list[tuple[InodeKey, FileDigests]]:
        with self._lock:
            queued, self._unrecorded = self._unrecorded, []
        return queued

    def sync(self) -> MirrorStats:
        """Walk every recorded path and make the sink match: add new keys, remove stale ones.

        Keys already in the sink are not inserted again; unchanged files hit the verification
        cache, so a warm sync costs a stat and two lookups per path, all in one read
        transaction (`open_snapshot`)."""
        started = time.monotonic()
        snapshot = open_snapshot(self._db)
        try:
            walk = _Walk(snapshot)
            generation = snapshot.generation
            paths = 0
            for path, recorded in snapshot.paths():
                paths += 1
                if not paths & 0xFF and self._cancelled:
                    raise SyncCancelled("the mirror's walk was cancelled")
                self._take(path, self._check.examine(path, recorded, walk), walk, recorded)
            if self._cancelled:
                raise SyncCancelled("the mirror's walk was cancelled")
            self._hash_queued(walk)
            deferred_total = len(walk.deferred)
            self._retry_deferred(walk)
        finally:
            snapshot.close()  # before any write from this process (verifications below)
        self._flush(walk)
        removed = self._drop_stale(walk.wanted)
        self._record(walk.verifications + self._take_unrecorded())
        self._generation = generation
        self._walked = True
        self._path_keys, self._key_refs, self._untrusted = {}, {}, {}
        self._adopt_paths(walk)
        return self._stats(walk, generation, paths, removed, deferred_total, started)

    def _stats(
        self, walk: _Walk, generation: int, paths: int, removed: int, deferred: int, started: float
    ) -> MirrorStats:
        return MirrorStats(
            generation=generation,
            paths=paths,
            inserted=walk.inserted,
            removed=removed,
            mirrored=len(self._keys),
            cached=walk.cached,
            hashed=walk.hashed,
            deferred=deferred,
            skipped=tuple(walk.skipped),
            elapsed=time.monotonic() - started,
        )

    def _take(self, path: str, outcome: _Outcome, walk: _Walk, recorded: tuple[bytes, ...]) -> None:
        """File one path's outcome: insert it, queue it for hashing or for later, or skip it."""
        if isinstance(outcome, _Verified):  # first: nearly every path of a warm sync
            keys, digest = outcome
            for key in keys:
                walk.wanted[key] = digest
            walk.path_keys[path] = keys
            walk.pending.extend(keys)
            if len(walk.pending) >= self._batch:
                self._flush(walk)
        elif isinstance(outcome, _ToHash):
            walk.to_hash[path] = (outcome, recorded)
        elif isinstance(outcome, _Deferred):
            walk.deferred[path] = (outcome.until_ns, recorded)
        else:
            walk.skipped.append(SkippedPath(path, outcome))

    def _retry_deferred(self, walk: _Walk) -> None:
        """Wait out the ctime tick of files that were too fresh, then verify them again.
        A file written again meanwhile is deferred again, at most three rounds."""
        for _round in range(3):
            if not walk.deferred:
                return
            wait_for_coarse_clock(max(until for until, _ in walk.deferred.values()))
            retry, walk.deferred = walk.deferred, {}
            for path in sorted(retry):
                recorded = retry[path][1]
                self._take(path, self._check.examine(path, recorded, walk), walk, recorded)
            self._hash_queued(walk)
        walk.skipped.extend(SkippedPath(p, REASON_UNSETTLED) for p in sorted(walk.deferred))
        walk.deferred.clear()

    def _hash_queued(self, walk: _Walk) -> None:
        """Hash the queued files on a thread pool (blake3 and read release the GIL)."""
        queued, walk.to_hash = walk.to_hash, {}
        for path, result in hash_many(list(queued), follow_symlinks=True):
            to_hash, recorded = queued[path]
            if not isinstance(result, HashingError):
                self.hash_count += 1
            outcome = self._check.check_hashed(path, to_hash, recorded, result, walk)
            self._take(path, outcome, walk, recorded)

    def _flush(self, walk: _Walk) -> None:
        """Insert the pending keys the sink does not hold yet, as one batch."""
        with self._lock:
            new = [k for k in dict.fromkeys(walk.pending) if k not in self._keys]
            inserted = self._insert(new, walk.wanted) if new else 0
        walk.inserted += inserted
        walk.pending.clear()

    def _insert(self, new: list[InodeKey], digests: dict[InodeKey, bytes]) -> int:
        """Insert keys the sink lacks (the lock held); returns how many went in. A full kernel
        map takes what fits: the rest stays out (denied: fail closed) and is counted in
        `overflow`, and the sync goes on, so that its removals still apply."""
        try:
            self._sink.add(new)
            done = len(new)
        except MapFullError as e:
            done = e.inserted
            self.overflow += len(new) - done
        for k in new[:done]:
            self._keys[k] = digests[k]
        return done

    def _drop_stale(self, wanted: dict[InodeKey, bytes]) -> int:
        """Remove keys neither walked nor first-seen-and-still-trusted; returns how many."""
        # Database reads outside the lock: verify_file (an exec waiting) must not queue behind.
        with self._lock:
            digests = set(self._first_seen.values())
        untrusted = {d for d in digests if not self._db.is_trusted(d)}
        with self._lock:
            for k in [k for k, d in self._first_seen.items() if d in untrusted]:
                del self._first_seen[k]
            stale = [k for k in self._keys if k not in wanted and k not in self._first_seen]
            for start in range(0, len(stale), self._batch):
                self._sink.remove(stale[start : start + self._batch])
            for k in stale:
                del self._keys[k]
            if not self._walked:  # adopted keys carry no digest yet (keys_for, untrust by digest)
                self._keys.update((k, d) for k, d in wanted.items() if k in self._keys)
        return len(stale)

    def _record(self, verifications: Sequence[tuple[InodeKey, FileDigests]]) -> None:
        """Cache what was hashed, in one transaction. Best effort: a read-only database or a
        busy writer only costs a re-read on the next start."""
        if not verifications:
            return
        try:
            self._db.record_verifications(verifications)
        except DatabaseError:
            pass


__all__ = [
    "MAX_FIRST_SEEN",
    "OVERLAYFS_SUPER_MAGIC",
    "REASON_CHANGED",
    "REASON_NOT_REGULAR",
    "REASON_OVERLAY_UNRESOLVED",
    "REASON_UNTRUSTED",
    "REASON_VANISHED",
    "UNKEYABLE_FS",
    "Mirror",
    "MirrorSource",
    "MirrorStats",
    "OverlayMount",
    "SkippedPath",
    "SyncSnapshot",
    "coarse_now_ns",
    "ctime_settled_at",
    "fs_magic",
    "kernel_has_multigrain",
    "map_size_for",
    "overlay_mounts",
    "overlay_real_stat",
]
