"""The live wake-up fires on a real LMDB commit and not on a read."""

from __future__ import annotations

import select
from pathlib import Path

from trustdb.db import TrustDB
from trustdb.service.watch import DatabaseWatch
from trustdb.walk import scan


def test_commit_wakes_reader_does_not(tmp_path: Path) -> None:
    db = tmp_path / "db"
    TrustDB.open(db, write=True).close()
    watch = DatabaseWatch(db)
    try:
        watch.changed()  # drain the creation
        with TrustDB.open(db) as t:
            assert t.generation >= 0
        assert not watch.changed()
        with TrustDB.open(db, write=True) as t:
            t.add_entries("manual", "manual", scan(["/bin/true"]))
        assert select.select([watch.fileno()], [], [], 2)[0]
        assert watch.changed()
    finally:
        watch.close()
