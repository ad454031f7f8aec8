"""Walking real trees: symlinks, loops, special files, unreadable and vanishing files."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from trustdb.hashing import FRESH_CTIME_SECONDS, HashingError, hash_many
from trustdb.model import SkippedEntry, TrustEntry
from trustdb.walk import SYMLINK_SKIPPED, scan, walk

NO_DAC = ["setpriv", "--inh-caps=-all", "--bounding-set=-dac_override,-dac_read_search", "--"]
"""Run as root without the capabilities that bypass file permissions (so mode 000 bites)."""


def tree(root: Path) -> Path:
    (root / "b" / "c").mkdir(parents=True)
    (root / "a.sh").write_bytes(b"#!/bin/sh\n")
    (root / "b" / "lib.so").write_bytes(b"\x7fELF" + b"\0" * 60)
    (root / "b" / "c" / "notes.txt").write_bytes(b"text")
    tool = root / "b" / "c" / "tool"
    tool.write_bytes(b"binary")
    tool.chmod(0o755)
    return root


def walked(paths: list[str]) -> tuple[list[str], list[SkippedEntry]]:
    files: list[str] = []
    skips: list[SkippedEntry] = []
    done = threading.Event()

    def run() -> None:
        for item in walk(paths):
            (skips if isinstance(item, SkippedEntry) else files).append(item)  # type: ignore[arg-type]
        done.set()

    threading.Thread(target=run, daemon=True).start()
    assert done.wait(10), "walk hung"
    return files, skips


def test_walk_is_sorted_and_recursive(tmp_path: Path) -> None:
    root = tree(tmp_path / "t")
    files, skips = walked([str(root)])
    rel = [os.path.relpath(f, root) for f in files]
    assert rel == ["a.sh", "b/lib.so", "b/c/notes.txt", "b/c/tool"]
    assert skips == []


def test_symlinks_followed_on_command_line_only(tmp_path: Path) -> None:
    root = tree(tmp_path / "t")
    (root / "b" / "link-to-tool").symlink_to(root / "b" / "c" / "tool")
    (root / "dirlink").symlink_to(root / "b")
    alias = tmp_path / "alias"
    alias.symlink_to(root)
    files, skips = walked([str(alias), str(root / "b" / "link-to-tool")])
    assert all(f.startswith(str(root) + "/") for f in files), "recorded under the real path"
    assert str(root / "b" / "c" / "tool") in files
    assert sorted(s.path for s in skips) == [
        str(root / "b" / "link-to-tool"),
        str(root / "dirlink"),
    ]
    assert all(s.reason == SYMLINK_SKIPPED and not s.fatal for s in skips)


def test_symlink_loops_cannot_hang(tmp_path: Path) -> None:
    root = tmp_path / "t"
    root.mkdir()
    (root / "x").symlink_to(root / "y")
    (root / "y").symlink_to(root / "x")
    (root / "up").symlink_to(root)
    files, skips = walked([str(root), str(root / "x")])
    assert files == []
    fatal = [s for s in skips if s.fatal]
    assert [(s.path, s.reason) for s in fatal] == [(str(root / "x"), "symlink loop")]


def test_special_files_are_skipped_without_opening(tmp_path: Path) -> None:
    root = tmp_path / "t"
    root.mkdir()
    os.mkfifo(root / "fifo")
    sock = socket.socket(socket.AF_UNIX)
    sock.bind(str(root / "sock"))
    try:
        files, skips = walked([str(root), str(root / "fifo"), "/dev/null"])
    finally:
        sock.close()
    assert files == []
    inside = {(os.path.basename(s.path), s.reason, s.fatal) for s in skips}
    assert ("fifo", "FIFO (not read)", False) in inside
    assert ("sock", "socket (not read)", False) in inside
    assert ("fifo", "not a regular file (FIFO)", True) in inside
    assert ("null", "not a regular file (character device)", True) in inside


def test_missing_and_dangling_arguments(tmp_path: Path) -> None:
    (tmp_path / "dangling").symlink_to(tmp_path / "nowhere")
    _files, skips = walked([str(tmp_path / "nope"), str(tmp_path / "dangling")])
    assert [(s.reason, s.fatal) for s in skips] == [
        ("no such file", True),
        ("dangling symlink", True),
    ]


@pytest.mark.root
def test_bind_mount_loop_cannot_hang(tmp_path: Path, as_root: None) -> None:
    root = tree(tmp_path / "t")
    loop = root / "b" / "loop"
    loop.mkdir()
    subprocess.run(["mount", "--bind", str(root), str(loop)], check=True)
    try:
        files, skips = walked([str(root)])
    finally:
        subprocess.run(["umount", str(loop)], check=True)
    assert len(files) == 4
    assert [s.path for s in skips] == [str(loop)]


def test_vanished_between_walk_and_hash(tmp_path: Path) -> None:
    root = tree(tmp_path / "t")
    files = [f for f in walk([str(root)]) if isinstance(f, str)]
    os.unlink(files[0])
    results = dict(hash_many(files))
    assert isinstance(results[files[0]], HashingError)
    assert "vanished" in str(results[files[0]])


def test_scan_records_executables_or_all_files(tmp_path: Path) -> None:
    root = tree(tmp_path / "t")
    entries = [e for e in scan([str(root)]) if isinstance(e, TrustEntry)]
    assert sorted(os.path.basename(e.path) for e in entries) == ["a.sh", "lib.so", "tool"]
    everything = [e for e in scan([str(root)], all_files=True) if isinstance(e, TrustEntry)]
    assert len(everything) == 4


SCAN = """
import json, sys
from trustdb.walk import scan
from trustdb.model import SkippedEntry
out = [(e.path, e.reason, e.fatal) if isinstance(e, SkippedEntry) else (e.path, None, None)
       for e in scan(sys.argv[1:], all_files=True)]
print(json.dumps(out))
"""


@pytest.mark.root
def test_unreadable_file_and_directory_are_reported(tmp_path: Path, as_root: None) -> None:
    root = tree(tmp_path / "t")
    (root / "b" / "c").chmod(0)
    (root / "a.sh").chmod(0)
    try:
        out = subprocess.run(
            [*NO_DAC, sys.executable, "-c", SCAN, str(root)],
            capture_output=True,
            text=True,
            check=True,
        )
    finally:
        (root / "b" / "c").chmod(0o755)
    rows = {
        (os.path.relpath(p, root), reason, fatal) for p, reason, fatal in json.loads(out.stdout)
    }
    assert rows == {
        ("a.sh", "unreadable (permission denied)", True),
        ("b/c", "cannot list directory: unreadable (permission denied)", True),
        ("b/lib.so", None, None),
    }


def test_scan_gives_settled_files_an_inode_key(tmp_path: Path) -> None:
    """A file changed within FRESH_CTIME_SECONDS of its read gets no inode key to cache
    (HashedFile.cacheable, tested in test_hashing); one that settled gets one."""
    root = tree(tmp_path / "t")
    time.sleep(FRESH_CTIME_SECONDS + 0.05)
    settled = [e for e in scan([str(root)]) if isinstance(e, TrustEntry)]
    assert all(e.inode is not None for e in settled)


def test_script_sources_are_recorded_by_default(tmp_path: Path) -> None:
    """Issue 10: script content (by name) is its own kind, recorded without --all-files."""
    from trustdb.model import FileKind

    (tmp_path / "mod.py").write_text("print('hi')\n")
    (tmp_path / "lib.pm").write_text("1;\n")
    (tmp_path / "notes.txt").write_text("not code\n")
    (tmp_path / "run").write_text("#!/bin/sh\necho\n")
    got = {os.path.basename(e.path): e.kind for e in scan([str(tmp_path)]) if isinstance(e, TrustEntry)}
    assert got == {
        "mod.py": FileKind.SCRIPT_SOURCE,
        "lib.pm": FileKind.SCRIPT_SOURCE,
        "run": FileKind.SCRIPT,
    }
