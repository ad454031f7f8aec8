"""The rpm importers against packages built by rpmbuild and rpmdbs written by rpm (conftest.py)."""

from __future__ import annotations

import hashlib
import json
import shutil
import sqlite3
import struct
from pathlib import Path

import blake3
import pytest
from trustdb_importers.ondisk import CONFIG_CHANGED, MISMATCH, SIZE_MISMATCH
from trustdb_importers.rpm import RpmDbImporter, RpmFileImporter, RpmImporterError
from trustdb_importers.rpmheader import package_header, parse_header_blob

from tests.importers.conftest import ELF_SOURCE, SCRIPT, RpmFiles, collect_all, run_tool, trustdb
from trustdb.db import TrustDB
from trustdb.model import FileKind

HELLO = "hello-2:1.0-1.x86_64"


@pytest.mark.parametrize("compressor", ["zstd", "gzip", "xz"])
def test_package_file_members_are_verified_and_recorded(
    rpm_files: RpmFiles, compressor: str
) -> None:
    importer = RpmFileImporter(path=str(rpm_files.packages[compressor]))
    assert importer.header().payload_compressor == compressor
    assert importer.source().label == "rpmfile:hello.x86_64"
    entries, skipped = collect_all(importer)
    elf = ELF_SOURCE.read_bytes()
    assert set(entries) == {
        "/usr/bin/hello",
        "/usr/bin/hello-script",
        "/usr/lib/hello/libhello.so",
        "/etc/hello/hook",
    }
    assert entries["/usr/bin/hello"].digest == blake3.blake3(elf).digest()
    assert entries["/usr/bin/hello"].sha256 == hashlib.sha256(elf).digest()
    assert entries["/usr/bin/hello"].origin == HELLO
    assert entries["/usr/bin/hello-script"].digest == blake3.blake3(SCRIPT).digest()
    assert entries["/usr/bin/hello-script"].kind is FileKind.SCRIPT
    assert entries["/usr/lib/hello/libhello.so"].kind is FileKind.ELF
    assert not skipped
    # The README was checked against its digest too, then left out as not executable.
    assert importer.stats.files == 5 and importer.stats.not_executable == 1


def test_truncated_package_is_refused(rpm_files: RpmFiles) -> None:
    importer = RpmFileImporter(path=str(rpm_files.truncated))
    with pytest.raises(RpmImporterError, match="truncated or corrupt payload.*refused"):
        collect_all(importer)


@pytest.mark.parametrize("compressor", ["zstd", "gzip", "xz"])
def test_corrupt_payload_is_refused(rpm_files: RpmFiles, compressor: str, tmp_path: Path) -> None:
    data = bytearray(rpm_files.packages[compressor].read_bytes())
    middle = len(data) - 2000  # inside the payload: headers come first and are smaller
    data[middle : middle + 64] = bytes(range(64))
    bad = tmp_path / "bad.rpm"
    bad.write_bytes(bytes(data))
    with pytest.raises(RpmImporterError, match="truncated or corrupt payload.*refused"):
        collect_all(RpmFileImporter(path=str(bad)))


def test_not_a_package_is_refused(tmp_path: Path) -> None:
    junk = tmp_path / "junk.rpm"
    junk.write_bytes(b"\0" * 200)
    with pytest.raises(RpmImporterError, match="not an RPM package"):
        RpmFileImporter(path=str(junk)).source()


def test_member_not_matching_its_header_digest_is_refused(
    rpm_files: RpmFiles, tmp_path: Path
) -> None:
    # Rebuild the package with a header that lies about one file: flip one hex digit of the
    # script's digest in the header (the payload is untouched).
    data = bytearray(rpm_files.packages["gzip"].read_bytes())
    good = hashlib.sha256(SCRIPT).hexdigest().encode()
    at = data.index(good)
    data[at] = ord("0") if data[at] != ord("0") else ord("1")
    forged = tmp_path / "forged.rpm"
    forged.write_bytes(bytes(data))
    entries, skipped = collect_all(RpmFileImporter(path=str(forged)))
    assert "/usr/bin/hello-script" not in entries
    (bad,) = skipped
    assert bad.path == "/usr/bin/hello-script" and bad.reason == MISMATCH and bad.fatal


def test_sha512_package_file_is_verified(rpm_files: RpmFiles) -> None:
    importer = RpmFileImporter(path=str(rpm_files.sha512))
    assert importer.header().algo_name == "sha512"
    entries, skipped = collect_all(importer)
    assert "/usr/bin/wide" in entries and not skipped


def test_unknown_digest_algorithm_refuses_the_package(rpm_files: RpmFiles, tmp_path: Path) -> None:
    # Rewrite RPMTAG_FILEDIGESTALGO in the main header to a value no rpm defines.
    data = bytearray(rpm_files.packages["gzip"].read_bytes())
    il, dl = struct.unpack_from(">II", data, 96 + 8)
    main = 96 + 16 + 16 * il + dl + (-dl % 8)
    il, dl = struct.unpack_from(">II", data, main + 8)
    for i in range(il):
        tag, _type, off, _count = struct.unpack_from(">IIiI", data, main + 16 + 16 * i)
        if tag == 5011:
            struct.pack_into(">I", data, main + 16 + 16 * il + off, 99)
    odd = tmp_path / "odd.rpm"
    odd.write_bytes(bytes(data))
    with pytest.raises(RpmImporterError, match="unknown file digest algorithm 99.*refused"):
        RpmFileImporter(path=str(odd)).source()


def test_installed_files_are_verified_on_disk(rpm_root: Path) -> None:
    importer = RpmDbImporter(root=str(rpm_root))
    assert importer.find_rpmdb() == f"{rpm_root}/var/lib/rpm/rpmdb.sqlite"
    entries, skipped = collect_all(importer)
    assert not skipped
    hello = entries[f"{rpm_root}/usr/bin/hello"]
    assert hello.origin == HELLO and hello.kind is FileKind.ELF
    assert hello.digest == blake3.blake3((rpm_root / "usr/bin/hello").read_bytes()).digest()
    assert entries[f"{rpm_root}/usr/bin/other"].origin == "other-2:1.0-1.x86_64"
    assert f"{rpm_root}/usr/bin/hello-link" not in entries  # symlink
    assert f"{rpm_root}/usr/share/doc/hello/README" not in entries  # documentation
    assert len(entries) == 8


def test_tampered_installed_file_is_reported_and_not_trusted(rpm_root: Path) -> None:
    script = rpm_root / "usr/bin/hello-script"
    script.write_bytes(SCRIPT.replace(b"hello", b"evil!"))  # same size, other content
    lib = rpm_root / "usr/lib/hello/libhello.so"
    lib.write_bytes(lib.read_bytes() + b"\0")
    entries, skipped = collect_all(RpmDbImporter(root=str(rpm_root)))
    reasons = {s.path: (s.reason, s.origin, s.fatal) for s in skipped}
    assert reasons == {
        str(script): (MISMATCH, HELLO, True),
        str(lib): (SIZE_MISMATCH, HELLO, True),
    }
    assert str(script) not in entries and str(lib) not in entries
    assert f"{rpm_root}/usr/bin/hello" in entries  # the rest proceeds


def test_installed_package_with_unsupported_digests_is_reported(
    rpm_root: Path, rpm_files: RpmFiles
) -> None:
    run_tool(
        "rpm", "--root", rpm_root, "--dbpath", "/var/lib/rpm", "-i", "--nodeps",
        "--nosignature", "--noscripts", rpm_files.sha512,
    )  # fmt: skip
    entries, skipped = collect_all(RpmDbImporter(root=str(rpm_root)))
    (bad,) = skipped
    assert bad.origin == "wide-2:1.0-1.x86_64" and bad.fatal
    assert "sha512 not supported" in bad.reason
    assert len(entries) == 8  # hello and other proceed


def test_locally_edited_config_file_is_reported_not_failed(rpm_root: Path) -> None:
    hook = rpm_root / "etc/hello/hook"
    hook.write_bytes(b"#!/bin/sh\necho edited by the admin\n")
    entries, skipped = collect_all(RpmDbImporter(root=str(rpm_root)))
    (edited,) = skipped
    assert edited.path == str(hook) and edited.reason == CONFIG_CHANGED and not edited.fatal
    assert str(hook) not in entries


def test_rpmdb_under_usr_lib_sysimage(rpm_root: Path) -> None:
    sysimage = rpm_root / "usr/lib/sysimage"
    sysimage.mkdir(parents=True)
    shutil.move(rpm_root / "var/lib/rpm", sysimage / "rpm")
    importer = RpmDbImporter(root=str(rpm_root))
    assert importer.find_rpmdb() == f"{sysimage}/rpm/rpmdb.sqlite"
    assert len(collect_all(importer)[0]) == 8


def test_corrupt_rpmdb_is_refused(rpm_root: Path) -> None:
    dbdir = rpm_root / "var/lib/rpm"
    for extra in dbdir.glob("rpmdb.sqlite-*"):
        extra.unlink()
    (dbdir / "rpmdb.sqlite").write_bytes(b"this is not sqlite" * 100)
    with pytest.raises(RpmImporterError, match="corrupt rpmdb.*refused"):
        collect_all(RpmDbImporter(root=str(rpm_root)))


def test_corrupt_header_skips_that_package_only(rpm_root: Path) -> None:
    db = rpm_root / "var/lib/rpm/rpmdb.sqlite"
    with sqlite3.connect(db) as con:
        hnum, blob = con.execute("SELECT hnum, blob FROM Packages WHERE hnum = 1").fetchone()
        name = package_header(parse_header_blob(blob)).name
        con.execute("UPDATE Packages SET blob = ? WHERE hnum = ?", (blob[:100], hnum))
    entries, skipped = collect_all(RpmDbImporter(root=str(rpm_root)))
    (bad,) = skipped
    assert bad.fatal and "corrupt package header #1" in bad.reason and bad.path == str(db)
    survivor = "other" if name == "hello" else "hello"
    assert {e.origin for e in entries.values()} == {f"{survivor}-2:1.0-1.x86_64"}


def test_locked_rpmdb_is_refused(rpm_root: Path) -> None:
    # rpm keeps its sqlite rpmdb in WAL mode, where readers see the last commit even while a
    # transaction runs. In rollback-journal mode a writer's exclusive lock blocks readers.
    db = rpm_root / "var/lib/rpm/rpmdb.sqlite"
    with sqlite3.connect(db) as con:
        con.execute("PRAGMA journal_mode=DELETE")
    holder = sqlite3.connect(db, isolation_level=None)
    try:
        holder.execute("BEGIN EXCLUSIVE")
        with pytest.raises(RpmImporterError, match="locked.*refused"):
            collect_all(RpmDbImporter(root=str(rpm_root), timeout=0.2))
    finally:
        holder.execute("ROLLBACK")
        holder.close()


def test_wal_rpmdb_reads_last_commit_during_a_transaction(rpm_root: Path) -> None:
    db = rpm_root / "var/lib/rpm/rpmdb.sqlite"
    holder = sqlite3.connect(db, isolation_level=None)
    try:
        holder.execute("BEGIN IMMEDIATE")
        holder.execute("DELETE FROM Packages")  # uncommitted: an rpm -e in progress
        assert len(collect_all(RpmDbImporter(root=str(rpm_root), timeout=0.2))[0]) == 8
    finally:
        holder.execute("ROLLBACK")
        holder.close()


def test_missing_rpmdb_is_refused(tmp_path: Path) -> None:
    with pytest.raises(RpmImporterError, match="no rpmdb.sqlite under"):
        collect_all(RpmDbImporter(root=str(tmp_path)))


def test_cli_installed_reimport_and_tamper(rpm_root: Path, cli_env: dict[str, str]) -> None:
    first = trustdb(cli_env, "import", "rpm", "--root", str(rpm_root), "--json")
    assert first.returncode == 0, first.stderr
    (src,) = json.loads(first.stdout)["sources"]
    assert src["source"] == f"rpm:{rpm_root}" and src["write"]["added"] == 8
    again = trustdb(cli_env, "import", "rpm", "--root", str(rpm_root), "--json")
    (src2,) = json.loads(again.stdout)["sources"]
    assert src2["write"]["added"] == 0 and src2["write"]["generation"] == src["write"]["generation"]

    (rpm_root / "usr/bin/other-script").write_bytes(b"#!/bin/sh\necho evil\n")
    tampered = trustdb(cli_env, "import", "rpm", "--root", str(rpm_root), "--quiet")
    assert tampered.returncode == 3
    assert f"FAILED  {rpm_root}/usr/bin/other-script [other-2:1.0-1.x86_64]" in tampered.stdout

    # Erased with rpm: its files stop being trusted by this source in the next import.
    run_tool(
        "rpm", "--root", rpm_root, "--dbpath", "/var/lib/rpm", "-e", "--nodeps", "--noscripts",
        "other",
    )  # fmt: skip
    erased = trustdb(cli_env, "import", "rpm", "--root", str(rpm_root), "--json")
    assert erased.returncode == 0, erased.stdout
    (src3,) = json.loads(erased.stdout)["sources"]
    assert src3["write"]["removed"] == 3  # other, libother.so, hook (other-script was untrusted)
    with TrustDB.open(Path(cli_env["TRUSTDB_DB"])) as db:
        origins = {r.origin for r in db.iter_paths(f"rpm:{rpm_root}")}
    assert origins == {HELLO}


def test_cli_package_files_one_refused_rest_proceed(
    rpm_files: RpmFiles, cli_env: dict[str, str]
) -> None:
    result = trustdb(
        cli_env, "import", "rpm", str(rpm_files.truncated), str(rpm_files.other), "--json"
    )
    assert result.returncode == 7
    assert "truncated or corrupt payload" in result.stderr
    sources = {s["source"]: s for s in json.loads(result.stdout)["sources"]}
    assert sources["rpmfile:hello.x86_64"]["write"] is None  # refused: nothing written
    assert sources["rpmfile:other.x86_64"]["write"]["added"] == 4
    with TrustDB.open(Path(cli_env["TRUSTDB_DB"])) as db:
        labels = {s.label for s in db.sources()}
    assert labels == {"rpmfile:other.x86_64"}
