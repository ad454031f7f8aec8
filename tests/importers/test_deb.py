"""The deb importer against dpkg databases written by the real dpkg (see conftest.py)."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import time
from pathlib import Path

import blake3
import pytest
from trustdb_importers import ondisk
from trustdb_importers.deb import DebImporter, DebImporterError
from trustdb_importers.ondisk import (
    CONFIG_CHANGED,
    MISMATCH,
    MISSING,
    NOT_REGULAR,
    UNVERIFIABLE,
    Root,
)

from tests.importers.conftest import collect_all, dpkg, trustdb
from trustdb.db import TrustDB
from trustdb.model import FileKind, InodeKey, SkippedEntry, TrustEntry

ORIGIN = "hello_1.0-1_amd64"


def collect(
    root: Path, *, all_files: bool = False, admindir: str | None = None
) -> tuple[dict[str, TrustEntry], list[SkippedEntry]]:
    return collect_all(DebImporter(root=str(root), all_files=all_files, admindir=admindir))


def test_records_executable_content_of_installed_packages(deb_root: Path) -> None:
    entries, skipped = collect(deb_root)
    elf = entries[f"{deb_root}/usr/bin/hello"]
    data = (deb_root / "usr/bin/hello").read_bytes()
    assert elf.digest == blake3.blake3(data).digest()
    assert elf.sha256 is None  # dpkg records MD5: no SHA-256 pass (issue 11)
    assert elf.md5 == hashlib.md5(data).digest()
    assert elf.kind is FileKind.ELF and elf.origin == ORIGIN
    assert entries[f"{deb_root}/usr/bin/hello-script"].kind is FileKind.SCRIPT
    # A shared library has no exec bit but is ELF: kept.
    assert entries[f"{deb_root}/usr/lib/hello/libhello.so"].kind is FileKind.ELF
    # A conffile script is verified against the MD5 in dpkg's status file.
    assert entries[f"{deb_root}/etc/hello/hook"].kind is FileKind.SCRIPT
    # Documentation is not executable: not recorded, not reported.
    assert f"{deb_root}/usr/share/doc/hello/README" not in entries
    assert not [s for s in skipped if s.origin == ORIGIN]


def test_a_file_changed_just_now_is_not_offered_for_caching(
    deb_root: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    script = deb_root / "usr/bin/hello-script"
    # "Just now" is relative to FRESH_SECONDS; widen it rather than race a loaded machine.
    monkeypatch.setattr(ondisk, "FRESH_SECONDS", 3600.0)
    entries, _ = collect(deb_root)
    assert entries[str(script)].inode is None  # trusted, but the next import reads it again
    monkeypatch.setattr(ondisk, "FRESH_SECONDS", 0.0)
    entries, _ = collect(deb_root)
    assert entries[str(script)].inode == InodeKey.from_stat(os.stat(script))


def test_all_files_records_documentation_too(deb_root: Path) -> None:
    entries, _ = collect(deb_root, all_files=True)
    assert entries[f"{deb_root}/usr/share/doc/hello/README"].kind is FileKind.OTHER


def test_tampered_file_is_reported_and_not_trusted(deb_root: Path) -> None:
    target = deb_root / "usr/bin/hello-script"
    target.write_bytes(b"#!/bin/sh\necho evil\n")
    entries, skipped = collect(deb_root)
    assert str(target) not in entries
    (bad,) = [s for s in skipped if s.path == str(target)]
    assert bad.reason == MISMATCH and bad.fatal and bad.origin == ORIGIN


def test_locally_edited_conffile_is_reported_not_failed(deb_root: Path) -> None:
    hook = deb_root / "etc/hello/hook"
    hook.write_bytes(b"#!/bin/sh\necho edited by the admin\n")
    entries, skipped = collect(deb_root)
    assert str(hook) not in entries
    (edited,) = [s for s in skipped if s.path == str(hook)]
    assert edited.reason == CONFIG_CHANGED and not edited.fatal


def test_fifo_in_place_of_a_file_is_reported_never_read(deb_root: Path) -> None:
    script = deb_root / "usr/bin/hello-script"
    script.unlink()
    os.mkfifo(script)  # opening it for reading would block forever
    entries, skipped = collect(deb_root)
    assert str(script) not in entries
    (bad,) = [s for s in skipped if s.path == str(script)]
    assert bad.reason == NOT_REGULAR


def test_package_without_md5sums_is_unverifiable(deb_root: Path) -> None:
    # dpkg >= 1.21 computes md5sums at unpack when a package ships none; older dpkg did not,
    # and such databases are still around: remove the file dpkg wrote.
    (deb_root / "var/lib/dpkg/info/nomd5.md5sums").unlink()
    entries, skipped = collect(deb_root)
    nomd5 = {s.path: s for s in skipped if s.origin == "nomd5_1.0-1_amd64"}
    assert any("no md5sums file" in s.reason for s in nomd5.values())
    # Its executables are named one by one and not trusted; its conffile has a digest in status.
    assert nomd5[f"{deb_root}/usr/bin/nomd5"].reason == UNVERIFIABLE
    assert f"{deb_root}/usr/bin/nomd5" not in entries
    assert f"{deb_root}/etc/nomd5/hook" in entries


def test_diverted_file_is_verified_where_it_lives(deb_root: Path) -> None:
    # Another package diverts hello's script away; hello's copy now lives at the diverted name.
    subprocess.run(
        ["dpkg-divert", f"--root={deb_root}", "--divert", "/usr/bin/hello-script.real",
         "--package", "other", "--rename", "--add", "/usr/bin/hello-script"],
        check=True, capture_output=True,
    )  # fmt: skip
    entries, skipped = collect(deb_root)
    assert f"{deb_root}/usr/bin/hello-script.real" in entries
    assert not [s for s in skipped if s.origin == ORIGIN]


def test_path_excluded_files_may_be_absent(
    deb_root: Path, tmp_path: Path, deb_files: dict[str, Path]
) -> None:
    # The way container images drop documentation: dpkg is told not to install it, but the
    # package's md5sums still list it. Re-install hello that way, with the real dpkg.
    conf = deb_root / "etc/dpkg/dpkg.cfg.d"
    conf.mkdir(parents=True)
    (conf / "excludes").write_text(
        "path-exclude=/usr/share/doc/*\npath-exclude /usr/lib/hello/*\n"
        "path-include=/usr/share/doc/*/copyright\n"
    )
    dpkg(deb_root, "--path-exclude=/usr/share/doc/*", "--path-exclude=/usr/lib/hello/*",
         "-i", deb_files["hello"])  # fmt: skip
    assert not (deb_root / "usr/share/doc/hello/README").exists()
    (deb_root / "usr/bin/hello").unlink()  # not excluded: its absence is reported
    entries, skipped = collect(deb_root)
    mine = [(s.path.removeprefix(str(deb_root)), s.reason) for s in skipped if s.origin == ORIGIN]
    assert mine == [("/usr/bin/hello", MISSING)]
    assert f"{deb_root}/usr/bin/hello-script" in entries


def test_missing_status_refuses_the_import(tmp_path: Path) -> None:
    with pytest.raises(DebImporterError, match="no dpkg database"):
        collect(tmp_path)


def test_broken_status_refuses_the_import(deb_root: Path) -> None:
    status = deb_root / "var/lib/dpkg/status"
    status.write_text(status.read_text() + "\nPackage: broken\nVersion: 1\n")
    with pytest.raises(DebImporterError, match="broken dpkg status file.*broken"):
        collect(deb_root)


def test_admindir_option(deb_root: Path, tmp_path: Path) -> None:
    admin = tmp_path / "admin"
    os.rename(deb_root / "var/lib/dpkg", admin)
    importer = DebImporter(root=str(deb_root), admindir=str(admin))
    assert importer.source().label == f"deb:{deb_root}@{admin}"
    entries, _ = collect(deb_root, admindir=str(admin))
    assert f"{deb_root}/usr/bin/hello" in entries


def test_symlinks_resolve_inside_the_root(tmp_path: Path) -> None:
    (tmp_path / "usr/lib").mkdir(parents=True)
    (tmp_path / "lib").symlink_to("/usr/lib")  # absolute: must mean ROOT/usr/lib
    (tmp_path / "usr/lib/x").write_text("x")
    assert Root(str(tmp_path)).resolve("lib/x") == f"{tmp_path}/usr/lib/x"
    (tmp_path / "loop").symlink_to("loop")
    with pytest.raises(Exception, match="symbolic links"):
        Root(str(tmp_path)).resolve("loop/x")


def test_cli_import_reimport_tamper_and_remove(deb_root: Path, cli_env: dict[str, str]) -> None:
    db_path = Path(cli_env["TRUSTDB_DB"])
    time.sleep(ondisk.FRESH_SECONDS)  # the fixture's files must be old enough to be cached
    first = trustdb(cli_env, "import", "deb", "--root", str(deb_root), "--json")
    assert first.returncode == 0, first.stderr
    (src,) = json.loads(first.stdout)["sources"]
    assert src["source"] == f"deb:{deb_root}" and src["write"]["added"] == 8
    generation = src["write"]["generation"]

    # Nothing changed: nothing written, and (ctime permitting) nothing re-read.
    again = trustdb(cli_env, "import", "deb", "--root", str(deb_root), "--json")
    (src,) = json.loads(again.stdout)["sources"]
    assert src["write"] == {"added": 0, "removed": 0, "unchanged": 8, "generation": generation}
    # Every trusted file came from the verification cache, MD5 included (dpkg's digest).
    assert src["stats"]["cache_hits"] == 8 and src["stats"]["bytes_hashed"] == 0

    (deb_root / "usr/bin/hello-script").write_bytes(b"#!/bin/sh\necho evil\n")
    tampered = trustdb(cli_env, "import", "deb", "--root", str(deb_root))
    assert tampered.returncode == 3
    assert f"FAILED  {deb_root}/usr/bin/hello-script [{ORIGIN}]" in tampered.stdout
    with TrustDB.open(db_path) as db:
        paths = {r.path for r in db.iter_paths(f"deb:{deb_root}")}
    assert f"{deb_root}/usr/bin/hello-script" not in paths

    # A removed package stops being trusted by this source in the next import.
    dpkg(deb_root, "--remove", "hello")
    trustdb(cli_env, "import", "deb", "--root", str(deb_root))
    with TrustDB.open(db_path) as db:
        paths = {r.path for r in db.iter_paths(f"deb:{deb_root}")}
    assert {p.removeprefix(str(deb_root)) for p in paths} == {
        "/etc/nomd5/hook",
        "/usr/bin/nomd5",
        "/usr/bin/nomd5-script",
        "/usr/lib/nomd5/libnomd5.so",
    }


def test_cli_refuses_a_broken_database_and_writes_nothing(
    tmp_path: Path, cli_env: dict[str, str]
) -> None:
    result = trustdb(cli_env, "import", "deb", "--root", str(tmp_path))
    assert result.returncode == 7
    assert result.stderr.startswith("trustdb: error: no dpkg database")


@pytest.mark.slow
def test_this_machines_dpkg_database(cli_env: dict[str, str]) -> None:
    if not os.path.exists("/var/lib/dpkg/status"):
        pytest.skip("this machine has no dpkg database")
    result = trustdb(cli_env, "import", "deb", "--json")
    assert result.returncode in (0, 3), result.stderr
    (src,) = json.loads(result.stdout)["sources"]
    assert src["source"] == "deb:/" and src["stats"]["packages"] > 100
    bash = Path("/usr/bin/bash").read_bytes()
    with TrustDB.open(Path(cli_env["TRUSTDB_DB"])) as db:
        assert db.is_trusted(blake3.blake3(bash).digest())


def test_unchanged_packages_are_kept_without_reading_and_any_change_reverifies(
    deb_root: Path, cli_env: dict[str, str]
) -> None:
    """An unchanged re-import keeps a package by its fingerprint (status fields, the stat keys
    of its md5sums and list files) and the inode keys of the files it recorded (SCHEMA: P).
    Each way the package can change makes the import read it again."""
    db_path = Path(cli_env["TRUSTDB_DB"])
    time.sleep(ondisk.FRESH_SECONDS)
    args = ("import", "deb", "--root", str(deb_root), "--json")

    def run() -> dict[str, object]:
        result = trustdb(cli_env, *args)
        assert result.returncode in (0, 3), result.stderr
        (src,) = json.loads(result.stdout)["sources"]
        return src  # type: ignore[no-any-return]

    first = run()
    assert first["stats"]["packages_kept"] == 0  # type: ignore[index]
    again = run()
    assert again["stats"]["packages_kept"] >= 1  # type: ignore[index]
    assert again["stats"]["files"] == first["stats"]["files"]  # type: ignore[index]
    assert again["stats"]["recorded"] == first["stats"]["recorded"]  # type: ignore[index]
    assert again["write"]["unchanged"] == first["write"]["added"]  # type: ignore[index]

    # A recorded file whose inode key changed (chmod moves ctime): the package is read again.
    hello = deb_root / "usr/bin/hello"
    hello.chmod(0o755)
    time.sleep(ondisk.FRESH_SECONDS)
    changed = run()
    assert changed["stats"]["packages_kept"] == again["stats"]["packages_kept"] - 1  # type: ignore[index]

    # A path untrusted by hand comes back with the next import (parts are dropped).
    untrust = trustdb(cli_env, "untrust", str(hello))
    assert untrust.returncode == 0, untrust.stderr
    restored = run()
    assert restored["write"]["added"] == 1  # type: ignore[index]
    with TrustDB.open(db_path) as db:
        assert db.is_trusted(blake3.blake3(hello.read_bytes()).digest())

    # The package's records rewritten (as an upgrade or reinstall does): read again.
    kept = run()["stats"]["packages_kept"]  # type: ignore[index]
    md5sums = deb_root / "var/lib/dpkg/info/hello.md5sums"
    md5sums.write_bytes(md5sums.read_bytes())
    assert run()["stats"]["packages_kept"] == kept - 1  # type: ignore[index]

    # Tampered content under a kept package: the key changed, so it is verified and fails.
    (deb_root / "usr/bin/hello-script").write_bytes(b"#!/bin/sh\necho evil\n")
    tampered = trustdb(cli_env, "import", "deb", "--root", str(deb_root))
    assert tampered.returncode == 3
    assert f"FAILED  {deb_root}/usr/bin/hello-script [{ORIGIN}]" in tampered.stdout


def test_a_package_with_failures_is_kept_with_its_failures_until_they_change(
    deb_root: Path, cli_env: dict[str, str]
) -> None:
    """A package whose files failed (a mismatch, a missing file) is kept by its fingerprint too
    (issue 11: nodejs, with 499 failed files, was read on every import), and its failures are
    reported again, exit status and all. Once a failed file changes, the package is read
    again: a repaired file is trusted, not hidden behind the remembered failure."""
    script = deb_root / "usr/bin/hello-script"
    good = script.read_bytes()
    script.write_bytes(b"#!/bin/sh\necho evil\n")
    (deb_root / "usr/lib/hello/libhello.so").rename(deb_root / "libhello.so.away")
    time.sleep(ondisk.FRESH_SECONDS)

    def run() -> tuple[int, dict[str, object], str]:
        result = trustdb(cli_env, "import", "deb", "--root", str(deb_root), "--json")
        assert result.returncode in (0, 3), result.stderr
        (src,) = json.loads(result.stdout)["sources"]
        return result.returncode, src, result.stdout

    def failures(src: dict[str, object]) -> set[tuple[str, str]]:
        return {(s["path"], s["reason"]) for s in src["skipped"]}  # type: ignore[attr-defined,index]

    code, first, _ = run()
    assert code == 3 and (str(script), MISMATCH) in failures(first)
    assert (f"{deb_root}/usr/lib/hello/libhello.so", MISSING) in failures(first)
    code, again, _ = run()
    assert code == 3
    assert again["stats"]["packages_kept"] == again["stats"]["packages"]  # type: ignore[index]
    assert failures(again) == failures(first)
    assert again["stats"]["fatal"] == first["stats"]["fatal"]  # type: ignore[index]
    assert again["stats"]["bytes_hashed"] == 0  # type: ignore[index]

    # Repaired: the script is read again and trusted; the library comes back too.
    script.write_bytes(good)
    (deb_root / "libhello.so.away").rename(deb_root / "usr/lib/hello/libhello.so")
    time.sleep(ondisk.FRESH_SECONDS)
    code, repaired, _ = run()
    assert code == 0 and not failures(repaired)
    assert repaired["stats"]["packages_kept"] == again["stats"]["packages_kept"] - 1  # type: ignore[index]
    with TrustDB.open(Path(cli_env["TRUSTDB_DB"])) as db:
        assert db.is_trusted(blake3.blake3(good).digest())


def test_status_parser_agrees_with_python_debian() -> None:
    """read_status parses dpkg's status file itself (python-debian's import and parser were a
    fifth of an unchanged re-import); on this machine's real status file both must agree."""
    from debian import deb822

    from trustdb_importers.deb import STATUS_FIELDS, status_paragraphs

    path = "/var/lib/dpkg/status"
    if not os.path.exists(path):
        pytest.skip("no dpkg status file on this machine")
    with open(path, "rb") as f:
        expected = [dict(p) for p in deb822.Deb822.iter_paragraphs(f, fields=list(STATUS_FIELDS))]
    with open(path, encoding="utf-8") as f:
        assert status_paragraphs(f.read()) == expected


def test_status_parser_refuses_a_line_that_is_not_a_field() -> None:
    from trustdb_importers.deb import status_paragraphs

    with pytest.raises(ValueError, match="line 2"):
        status_paragraphs("Package: a\nno colon here\n")


def test_a_corrupt_part_record_is_not_trusted_blindly(
    deb_root: Path, cli_env: dict[str, str]
) -> None:
    """A part record naming a file whose key does not match is simply a miss."""
    time.sleep(ondisk.FRESH_SECONDS)
    assert trustdb(cli_env, "import", "deb", "--root", str(deb_root)).returncode == 0
    hello = deb_root / "usr/bin/hello"
    hello.unlink()  # vanished: the recorded key cannot match
    result = trustdb(cli_env, "import", "deb", "--root", str(deb_root))
    assert result.returncode == 0 and "missing" not in result.stderr
    with TrustDB.open(Path(cli_env["TRUSTDB_DB"])) as db:
        assert f"{deb_root}/usr/bin/hello" not in {r.path for r in db.iter_paths()}
