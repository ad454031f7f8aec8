"""Interpreters recognised by recorded name (`trustdb run`'s start-up reads every path record
for them once): the database pass and the name match, against a real LMDB database."""

from __future__ import annotations

from pathlib import Path

import blake3

from trustdb.confine.programs import interpreter_names, recorded_interpreters
from trustdb.db import TrustDB
from trustdb.model import FileKind, TrustEntry
from trustdb.policy import load as policies


def _entry(path: str) -> TrustEntry:
    return TrustEntry(path, blake3.blake3(path.encode()).digest(), 10, FileKind.ELF)


def test_a_trusted_copy_under_an_interpreters_name_is_an_interpreter(tmp_path: Path) -> None:
    policy = policies.load("agent")
    named = interpreter_names(policy)
    assert named is not None
    paths = ["/opt/pyenv/versions/3.11.7/bin/python3.11", "/usr/bin/ls", "/home/u/bin/perl5.36",
             "/srv/python3.11/notpython", "/usr/bin/bash", "/tmp/dir/xbash"]
    with TrustDB.open(tmp_path / "db", write=True) as db:
        db.replace_source("s", "s", (_entry(p) for p in paths))
    with TrustDB.open(tmp_path / "db") as db:
        found = db.paths_named(named)
    assert sorted(p for p, _d in found) == [
        "/home/u/bin/perl5.36", "/opt/pyenv/versions/3.11.7/bin/python3.11", "/usr/bin/bash"]
    recorded = recorded_interpreters(policy, found)
    assert recorded[_entry("/usr/bin/bash").digest] == "bash"
    assert recorded[_entry(paths[0]).digest] == "python3.11"
