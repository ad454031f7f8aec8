"""Hashing from a mapping (trustdb.mapped): the same digests as reading, and never a SIGBUS.

The attack that rejected a plain mapping: truncate the file while it is mapped, so that the
next access past the new end kills the command. Here the truncate must wait for our lease,
and the hash must end as "changed while being hashed", in a live process."""

from __future__ import annotations

import fcntl
import os
import signal
import threading
from collections.abc import Iterator
from pathlib import Path

import blake3
import pytest

from trustdb import hashing, mapped
from trustdb.hashing import HashingError, hash_file

SIZE = 8 << 20


@pytest.fixture
def mapping(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Iterator[None]:
    """Mapping allowed in this (main-thread) test process, windows of 1 MiB; SIGIO restored."""
    fd = os.open(tmp_path, os.O_RDONLY)
    try:
        if not mapped._local(fd):
            pytest.skip("the test directory's filesystem is not one trustdb maps (ext4, xfs...)")
    finally:
        os.close(fd)
    old = signal.getsignal(signal.SIGIO)
    assert mapped.allow_mapping(), "lease-break-time too short, or a SIGIO handler is set"
    monkeypatch.setattr(mapped, "WINDOW", 1 << 20)
    yield
    mapped._allowed = False
    signal.signal(signal.SIGIO, old)


@pytest.fixture
def big(tmp_path: Path) -> Path:
    path = tmp_path / "big.bin"
    path.write_bytes(os.urandom(SIZE))
    return path


def test_mapped_digests_match_reads(mapping: None, big: Path) -> None:
    mapped_result = hash_file(str(big), want_md5=True, want_sha256=True)
    mapped._allowed = False
    read_result = hash_file(str(big), want_md5=True, want_sha256=True)
    assert mapped_result.digests == read_result.digests
    assert mapped_result.digests.blake3 == blake3.blake3(big.read_bytes()).digest()


def test_a_file_is_really_mapped(mapping: None, big: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Guards the test above: on this machine (a local filesystem, root) the mapping is used."""
    fed: list[int] = []
    real = mapped.hash_mapped
    monkeypatch.setattr(
        hashing,
        "hash_mapped",
        lambda *a: fed.append(r := real(*a)) or r,  # type: ignore[func-returns-value]
    )
    hash_file(str(big))
    assert fed == [SIZE]


def test_truncate_while_mapped_waits_and_is_reported(
    mapping: None, big: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A truncate begun after the first window waits on our lease: we unmap, let go, read the
    rest, and the shrunk file is reported. Without the lease this process would die of SIGBUS."""
    truncater = threading.Thread(target=os.truncate, args=(big, 0))
    real_resident = mapped._resident
    leased_fd: list[int] = []

    def resident_then_truncate(addr: int, length: int, vec: object) -> bool:
        if not truncater.is_alive() and not leased_fd:
            leased_fd.append(1)
            truncater.start()
            _wait_for_break(big)
        return real_resident(addr, length, vec)  # type: ignore[arg-type]

    original = blake3.blake3(big.read_bytes()).digest()
    monkeypatch.setattr(mapped, "_resident", resident_then_truncate)
    # The truncate gets in when we let go of the lease; whether our last fstat comes before it
    # is the scheduler's choice. Either the change is reported, or every byte hashed was read
    # before it: never a digest of a mix, never a SIGBUS.
    try:
        result = hash_file(str(big))
    except HashingError as e:
        assert "changed while being hashed" in str(e)
    else:
        assert result.digests.blake3 == original
    truncater.join(timeout=10)
    assert not truncater.is_alive() and big.stat().st_size == 0


def _wait_for_break(path: Path) -> None:
    """Until the truncate is blocked on a lease (visible in /proc/locks as a breaking lease)."""
    ino = path.stat().st_ino
    for _ in range(2000):  # 20 s: a loaded machine can be slow to run the truncating thread
        with open("/proc/locks") as f:
            if any("LEASE" in line and "BREAKING" in line and f":{ino} " in line for line in f):
                return
        threading.Event().wait(0.01)
    raise AssertionError("the truncate never waited on the lease")


def test_a_file_open_for_writing_is_read_not_mapped(mapping: None, big: Path) -> None:
    """The lease is refused while a writer holds the file: then it is read, same digest."""
    with open(big, "r+b"):
        fd = os.open(big, os.O_RDONLY)
        try:
            assert (
                mapped.hash_mapped(fd, SIZE, [blake3.blake3().update], bytearray(1 << 20)) is None
            )
        finally:
            os.close(fd)
        assert hash_file(str(big)).digests.blake3 == blake3.blake3(big.read_bytes()).digest()


def test_pages_not_in_cache_are_read(
    mapping: None, big: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A window whose pages are not resident is read with pread (no fault to the disk)."""
    fd = os.open(big, os.O_RDONLY)
    try:
        os.fsync(fd)
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)
    read_ranges: list[int] = []
    real = mapped._feed_range
    monkeypatch.setattr(
        mapped,
        "_feed_range",
        lambda fd, off, n, u, b: read_ranges.append(off) or real(fd, off, n, u, b),  # type: ignore[func-returns-value]
    )
    assert hash_file(str(big)).digests.blake3 == blake3.blake3(big.read_bytes()).digest()
    assert 0 in read_ranges  # the first window was evicted, so it was read


def test_no_mapping_unless_allowed(big: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(mapped, "_allowed", False)
    fd = os.open(big, os.O_RDONLY)
    try:
        assert mapped.hash_mapped(fd, SIZE, [blake3.blake3().update], bytearray(1 << 20)) is None
        assert fcntl.fcntl(fd, fcntl.F_GETLEASE) == fcntl.F_UNLCK
    finally:
        os.close(fd)


def test_the_pool_maps_only_while_open(big: Path) -> None:
    """An ignored SIGIO outlives exec: after the pool closes, SIGIO and mapping are as before."""
    from trustdb.hashpool import HashPool

    before = signal.getsignal(signal.SIGIO)
    assert before is not signal.SIG_IGN or not mapped._allowed
    with HashPool(workers=1) as pool:
        assert signal.getsignal(signal.SIGIO) is signal.SIG_IGN and mapped._allowed
        ((_path, result),) = list(pool.hash_paths([str(big)]))
        assert isinstance(result, tuple) and result[0] == blake3.blake3(big.read_bytes()).digest()
    assert signal.getsignal(signal.SIGIO) == before and not mapped._allowed


def test_a_file_that_shrank_before_the_lease_is_not_mapped(mapping: None, big: Path) -> None:
    """The size the caller saw is checked again under the lease: no mapping past a new end."""
    fd = os.open(big, os.O_RDONLY)
    try:
        os.truncate(big, SIZE // 2)
        assert mapped.hash_mapped(fd, SIZE, [blake3.blake3().update], bytearray(1 << 20)) is None
    finally:
        os.close(fd)


def test_trust_survives_a_file_truncated_and_rewritten_in_a_loop(
    tmp_path: Path, cli_env: dict[str, str]
) -> None:
    """The attack end to end: another process truncates and rewrites a large file as fast as
    it can while `trustdb trust --all-files` hashes it from a mapping. Every run must end with a
    verdict (0: recorded, 3: reported as changed), never killed by a signal."""
    import subprocess
    import sys
    import time

    tree = tmp_path / "tree"
    tree.mkdir()
    victim = tree / "big.bin"
    victim.write_bytes(os.urandom(32 << 20))
    loop = (
        "import os, sys, time\n"
        "p, data = sys.argv[1], os.urandom(32 << 20)\n"
        "end = time.monotonic() + 60\n"
        "while time.monotonic() < end:\n"
        "    with open(p, 'r+b') as f:\n"
        "        f.truncate(0); f.write(data)\n"
    )
    churn = subprocess.Popen([sys.executable, "-c", loop, str(victim)])
    try:
        time.sleep(0.2)
        codes = [
            subprocess.run(
                [sys.executable, "-c", "from trustdb.cli import main; main()", "trust", "-q"]
                + ["--all-files", str(tree)],
                env=cli_env,
                capture_output=True,
                check=False,
                timeout=120,
            ).returncode
            for _ in range(10)
        ]
    finally:
        churn.kill()
        churn.wait()
    assert all(code in (0, 3) for code in codes), codes
