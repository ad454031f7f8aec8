"""Hashing real files: digests match b3sum/hashlib, bad inputs fail fast with a reason."""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import threading
import time
from pathlib import Path

import pytest

from trustdb.hashing import (
    FRESH_CTIME_SECONDS,
    HUGE_FILE,
    SMALL_FILE,
    HashingError,
    NotExecutable,
    classify,
    hash_file,
    hash_many,
)
from trustdb.model import FileKind


def b3sum(path: Path) -> bytes:
    if shutil.which("b3sum") is None:
        pytest.fail("b3sum is not installed (packaging/apt-packages.txt lists it)")
    out = subprocess.run(["b3sum", "--no-names", str(path)], check=True, capture_output=True)
    return bytes.fromhex(out.stdout.decode().strip())


@pytest.mark.parametrize(
    "size", [0, 1, 4095, SMALL_FILE - 1, SMALL_FILE, SMALL_FILE + 1, 3 * SMALL_FILE + 7]
)
def test_digests_match_b3sum_and_hashlib(tmp_path: Path, size: int) -> None:
    f = tmp_path / "f"
    data = os.urandom(size)
    f.write_bytes(data)
    h = hash_file(str(f), want_sha256=True, want_md5=True)
    assert h.digests.blake3 == b3sum(f)
    assert h.digests.sha256 == hashlib.sha256(data).digest()
    assert h.digests.md5 == hashlib.md5(data).digest()
    assert h.digests.size == size == h.stat.st_size


def test_huge_file_uses_blake3_threads_and_still_matches(tmp_path: Path) -> None:
    f = tmp_path / "huge"
    with open(f, "wb") as out:
        out.truncate(HUGE_FILE + 12345)  # sparse: cheap to create, read as zeros
    assert hash_file(str(f)).digests.blake3 == b3sum(f)


def test_classify() -> None:
    assert classify(b"\x7fELF", 0o644) == FileKind.ELF
    assert classify(b"#!/b", 0o644) == FileKind.SCRIPT
    assert classify(b"abcd", 0o755) == FileKind.EXECUTABLE
    assert classify(b"abcd", 0o644) == FileKind.OTHER
    assert hash_file("/bin/sh").digests.kind == FileKind.ELF


def test_fifo_is_refused_without_blocking(tmp_path: Path) -> None:
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    result: list[BaseException] = []
    t = threading.Thread(target=lambda: result.append(_raises(str(fifo))), daemon=True)
    t.start()
    t.join(5)
    assert not t.is_alive(), "hashing a FIFO blocked"
    assert "not a regular file" in str(result[0])


def _raises(path: str) -> BaseException:
    try:
        hash_file(path)
    except HashingError as e:
        return e
    raise AssertionError("no error")


def test_errors_name_the_reason(tmp_path: Path) -> None:
    assert "vanished" in str(_raises(str(tmp_path / "gone")))
    assert "not a regular file" in str(_raises(str(tmp_path)))
    link = tmp_path / "link"
    link.symlink_to(tmp_path / "target")
    (tmp_path / "target").write_bytes(b"x")
    with pytest.raises(HashingError, match="cannot open"):
        hash_file(str(link), follow_symlinks=False)


def test_change_during_hashing_is_detected(tmp_path: Path) -> None:
    f = tmp_path / "growing"
    f.write_bytes(b"\0" * (8 * SMALL_FILE))
    stop = threading.Event()

    def append() -> None:
        with open(f, "ab") as out:
            while not stop.is_set():
                out.write(b"x" * 4096)
                out.flush()

    writer = threading.Thread(target=append)
    writer.start()
    try:
        with pytest.raises(HashingError, match="changed while being hashed"):
            for _ in range(20):  # the writer wins the race within a few tries at most
                hash_file(str(f))
    finally:
        stop.set()
        writer.join()


def test_executable_only_skips_without_reading(tmp_path: Path) -> None:
    data = tmp_path / "data"
    data.write_bytes(b"plain text" * 1000)
    script = tmp_path / "script"
    script.write_bytes(b"#!/bin/sh\necho hi\n")
    with pytest.raises(NotExecutable):
        hash_file(str(data), executable_only=True)
    assert hash_file(str(script), executable_only=True).digests.kind == FileKind.SCRIPT


def test_hash_many_keeps_order_and_reports_per_file(tmp_path: Path) -> None:
    paths = []
    for i in range(300):
        f = tmp_path / f"f{i}"
        f.write_bytes(os.urandom(i * 37))
        paths.append(str(f))
    paths.insert(150, str(tmp_path / "missing"))
    results = list(hash_many(paths, workers=3, batch=7))
    assert [p for p, _ in results] == paths
    errors = [(p, r) for p, r in results if isinstance(r, HashingError)]
    assert [p for p, _ in errors] == [str(tmp_path / "missing")]
    for name, r in results[:5]:
        assert not isinstance(r, HashingError) and r.digests.blake3 == b3sum(Path(name))


def test_just_changed_file_is_not_cacheable(tmp_path: Path) -> None:
    f = tmp_path / "f"
    f.write_bytes(b"#!/bin/sh\n")
    assert not hash_file(str(f)).cacheable, "ctime within FRESH_CTIME_SECONDS of the read"
    time.sleep(FRESH_CTIME_SECONDS + 0.01)
    h = hash_file(str(f))
    assert h.cacheable and h.hashed_at >= h.stat.st_ctime_ns / 1e9 + FRESH_CTIME_SECONDS
