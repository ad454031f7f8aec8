"""`_Txn.put_entries` writes a new fact inline (the main process of a trust is the bottleneck);
the bytes it leaves must be exactly those of the methods it stands for (put_entry,
touch_content, note_path, note_digest, cache_entry), which every other case still uses."""

from __future__ import annotations

import os
import time
from pathlib import Path

import lmdb
import pytest

from trustdb.db import TrustDB
from trustdb.dbschema import _U32, path_key
from trustdb.dbwrite import _Txn
from trustdb.model import FileKind, InodeKey, TrustEntry

NOW = 1_700_000_000.0


def _entries() -> list[TrustEntry]:
    old = InodeKey(2049, 0, int(NOW) - 3600, 5)
    fresh = InodeKey(2049, 0, int(NOW), 0)  # changed just now: never cached
    shared = bytes(range(32))
    return [
        TrustEntry("/t/a", shared, 10, FileKind.ELF, inode=old._replace(ino=1)),
        TrustEntry("/t/b", shared, 10, FileKind.ELF, inode=old._replace(ino=2)),  # same content
        TrustEntry("/t/c", bytes(32), 3, FileKind.SCRIPT, origin="pkg-1.0", inode=None),
        TrustEntry("/t/d", b"\x01" * 32, 7, FileKind.OTHER, inode=fresh._replace(ino=4)),
        TrustEntry("/t/" + "x" * 600, b"\x02" * 32, 1, FileKind.SCRIPT_SOURCE,
                   inode=old._replace(ino=5)),
        TrustEntry("/t/\udcff", b"\x03" * 32, 2, FileKind.ELF, inode=old._replace(ino=6)),
    ]


def _dump(path: Path) -> list[tuple[bytes, bytes]]:
    env = lmdb.open(str(path), readonly=True, lock=False)
    try:
        with env.begin() as txn:
            return list(txn.cursor())
    finally:
        env.close()


def test_inline_new_facts_are_the_methods_bytes(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(time, "time", lambda: NOW)
    entries = _entries()
    with TrustDB.open(tmp_path / "inline", write=True) as tdb:
        stats = tdb.add_entries("dir:/t", "dir", lambda: iter(entries))
    assert (stats.added, stats.unchanged) == (len(entries), 0)

    def by_methods(t: _Txn) -> None:
        sid = t.source_id("dir:/t", "dir", create=True)
        assert sid is not None
        for e in entries:
            raw = os.fsencode(e.path)
            ek = path_key(e.path) + b"\0" + _U32.pack(sid)
            assert t.put_entry(_U32.pack(sid), ek, raw, e) == (True, True)
            if e.inode is not None:
                t.cache_entry(e, NOW)
        t.adjust_source("dir:/t", "dir", len(entries))

    with TrustDB.open(tmp_path / "methods", write=True) as tdb:
        tdb._run_write(by_methods)
    inline, methods = _dump(tmp_path / "inline"), _dump(tmp_path / "methods")
    assert inline == methods
    assert sum(k.startswith(b"V") for k, _v in inline) == 4  # the fresh key is not cached
