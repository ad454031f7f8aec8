"""The mirror's first-seen files: a key the mirror has not walked (a copy of trusted content, a
trusted file after chmod or rename: its ctime moved) verified on demand and inserted into the
sink (`Mirror.verify_file`). The policy's JIT and interpreter paths are resolved through it
(trustdb.confine.programs); a `run`'s exec-time first-seen decisions are the fanotify handler's
(trustdb.first_seen), which reads the kernel map itself.

A mixin of trustdb.mirror.Mirror: it shares the mirror's lock, key table and sink.
"""

from __future__ import annotations

import os
import stat as statmod
import threading

from trustdb import fskeys
from trustdb.backends.interface import KeySink
from trustdb.fskeys import ctime_settled_at, fs_magic, kernel_keys, wait_for_coarse_clock
from trustdb.hashing import HashedFile, HashingError, hash_fd, hash_file
from trustdb.mirrorsource import MirrorSource
from trustdb.mirrorwalk import PathCheck, same_file
from trustdb.model import FileDigests, InodeKey

MAX_FIRST_SEEN = 65536
"""Keys inserted by `verify_file` that are kept (oldest dropped first)."""

MAX_RECENT = 4096
"""Digests `verify_file` remembers in memory, and verifications it queues for the database."""


class FirstSeenFiles:
    """`verify_file` and its memory; the state is the Mirror's (set by its __init__)."""

    _db: MirrorSource
    _sink: KeySink
    _lock: threading.Lock
    _check: PathCheck
    _first_seen_wait: int
    _keys: dict[InodeKey, bytes]
    _first_seen: dict[InodeKey, bytes]
    _recent: dict[InodeKey, FileDigests]
    _unrecorded: list[tuple[InodeKey, FileDigests]]
    hash_count: int

    def verify_file(self, target: str | int) -> InodeKey | None:
        """Key of a file about to be executed or mapped, inserted into the sink if its content
        is trusted; None if not trusted or not keyable.

        Returns at once (no database read) when the key is
        already in the sink; otherwise re-hashes (a copy of trusted content, a trusted file
        after chmod or rename), inserts the new key and returns it. `target` is a path or an
        open fd. From a fanotify permission handler pass the event fd: opening the path again
        would raise a new permission event that waits on this very handler. An fd is read from
        offset 0 (its file position is consumed). Safe to call from another thread than sync.
        """
        try:
            st = os.fstat(target) if isinstance(target, int) else os.stat(target)
        except OSError:
            return None
        key = InodeKey.from_stat(st)
        with self._lock:
            if key in self._keys:
                return key
        if not statmod.S_ISREG(st.st_mode):
            return None
        try:
            magic = fs_magic(target)
            path = os.readlink(f"/proc/self/fd/{target}") if isinstance(target, int) else target
        except OSError:
            return None
        keys = kernel_keys(path, st, magic)
        if isinstance(keys, str):
            return None
        if not self._check.settled(st, magic):
            if ctime_settled_at(st) - fskeys.coarse_now_ns() > self._first_seen_wait:
                return None
            wait_for_coarse_clock(ctime_settled_at(st))
        digests = self._digest_of(target, st, key)
        if digests is None or not self._db.is_trusted(digests.blake3):
            return None
        self._insert_first_seen(keys, digests.blake3)
        return key

    def _insert_first_seen(self, keys: tuple[InodeKey, ...], digest: bytes) -> None:
        with self._lock:
            new = [k for k in keys if k not in self._keys]
            if not new:
                return
            self._sink.add(new)
            for key in new:
                self._keys[key] = digest
                self._first_seen[key] = digest
            while len(self._first_seen) > MAX_FIRST_SEEN:
                # Oldest first: most are copies long deleted or rewritten (their key is dead).
                oldest = next(iter(self._first_seen))
                del self._first_seen[oldest]
                del self._keys[oldest]
                self._sink.remove([oldest])

    def _digest_of(
        self, target: str | int, st: os.stat_result, key: InodeKey
    ) -> FileDigests | None:
        """Digest of the file: remembered from a recent call (an untrusted binary run in a
        loop is read once), cached in the database, or read now. Files that are neither ELF
        nor `#!` nor executable are not read: a data file opened by a confined task has nothing
        to trust."""
        with self._lock:
            recent = self._recent.get(key)
        if recent is not None and recent.size == st.st_size:
            return recent
        cached = self._db.digest_cache().lookup(key, st.st_size)
        if cached is not None:
            return cached
        try:
            hashed = self._hash_target(target)
        except (HashingError, OSError):
            return None
        self.hash_count += 1
        if not same_file(st, hashed.stat):
            return None
        with self._lock:
            self._recent[key] = hashed.digests
            if len(self._recent) > MAX_RECENT:
                del self._recent[next(iter(self._recent))]
            if len(self._unrecorded) < MAX_RECENT:
                self._unrecorded.append((key, hashed.digests))
        return hashed.digests

    @staticmethod
    def _hash_target(target: str | int) -> HashedFile:
        if isinstance(target, str):
            hashed = hash_file(target, executable_only=True)
            if not same_file(hashed.stat, os.stat(target)):
                raise HashingError("changed while being hashed")
            return hashed
        os.lseek(target, 0, os.SEEK_SET)
        return hash_fd(target, executable_only=True)
