"""The python importer against a venv made in the test, with a package installed by pip."""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import blake3
import pytest
from trustdb_importers.ondisk import MISMATCH
from trustdb_importers.python import PythonImporter, PythonImporterError

from tests.importers.conftest import collect_all, trustdb
from trustdb.db import TrustDB
from trustdb.model import FileKind, SkippedEntry, TrustEntry


def collect(
    path: Path, *, all_files: bool = False
) -> tuple[dict[str, TrustEntry], list[SkippedEntry]]:
    return collect_all(PythonImporter(path=str(path), all_files=all_files))


def site_packages(venv: Path) -> Path:
    (site,) = venv.glob("lib/python3*/site-packages")
    return site


def test_console_script_is_verified_and_recorded(venv: Path) -> None:
    entries, skipped = collect(venv)
    script = entries[f"{venv}/bin/tinypkg-hello"]
    data = (venv / "bin/tinypkg-hello").read_bytes()
    assert script.kind is FileKind.SCRIPT and script.origin == "tinypkg==0.1"
    assert script.digest == blake3.blake3(data).digest()
    assert script.sha256 == hashlib.sha256(data).digest()
    # pip's own scripts come from pip's RECORD, with pip's provenance.
    assert entries[f"{venv}/bin/pip"].origin.startswith("pip==")
    # A module is script content by name (FileKind.SCRIPT_SOURCE, issue 10): recorded by
    # default, so that a trusted interpreter may load it.
    module = f"{site_packages(venv)}/tinypkg/__init__.py"
    assert entries[module].kind is FileKind.SCRIPT_SOURCE
    assert not skipped


def test_all_files_records_modules(venv: Path) -> None:
    entries, _ = collect(venv, all_files=True)
    module = entries[f"{site_packages(venv)}/tinypkg/__init__.py"]
    assert module.kind is FileKind.SCRIPT_SOURCE and module.origin == "tinypkg==0.1"


def test_site_packages_dir_directly(venv: Path) -> None:
    entries, _ = collect(site_packages(venv))
    assert f"{venv}/bin/tinypkg-hello" in entries  # RECORD's ../../../bin path


def test_tampered_script_is_reported_and_not_trusted(venv: Path) -> None:
    script = venv / "bin/tinypkg-hello"
    script.write_bytes(script.read_bytes().replace(b"main()", b"evil()"))
    entries, skipped = collect(venv)
    assert str(script) not in entries
    (bad,) = skipped
    assert bad.path == str(script) and bad.reason == MISMATCH and bad.origin == "tinypkg==0.1"


def test_distribution_without_record_is_unverifiable(venv: Path) -> None:
    (dist,) = site_packages(venv).glob("tinypkg-*.dist-info")
    (dist / "RECORD").unlink()
    entries, skipped = collect(venv)
    (bad,) = skipped
    assert bad.path == str(dist) and "no RECORD" in bad.reason and not bad.fatal
    assert f"{venv}/bin/tinypkg-hello" not in entries


def test_malformed_record_line_is_reported(venv: Path) -> None:
    (dist,) = site_packages(venv).glob("tinypkg-*.dist-info")
    with open(dist / "RECORD", "a") as f:
        f.write("tinypkg/x.py,sha256=!!notbase64!!,3\n")
    _, skipped = collect(venv)
    (bad,) = skipped
    assert bad.path.startswith(f"{dist}/RECORD:") and "malformed" in bad.reason and bad.fatal


def test_not_an_environment_is_refused(tmp_path: Path) -> None:
    with pytest.raises(PythonImporterError, match="no Python environment"):
        collect(tmp_path)


def test_cli_import_reimport_and_uninstall(venv: Path, cli_env: dict[str, str]) -> None:
    first = trustdb(cli_env, "import", "python", str(venv), "--json")
    assert first.returncode == 0, first.stderr
    (src,) = json.loads(first.stdout)["sources"]
    assert src["source"] == f"python:{venv}" and src["write"]["added"] > 0
    again = trustdb(cli_env, "import", "python", str(venv), "--json")
    (src2,) = json.loads(again.stdout)["sources"]
    assert src2["write"]["added"] == 0 and src2["write"]["removed"] == 0

    # The distribution is gone: its files stop being trusted by this source.
    (dist,) = site_packages(venv).glob("tinypkg-*.dist-info")
    shutil.rmtree(dist)
    (venv / "bin/tinypkg-hello").unlink()
    third = trustdb(cli_env, "import", "python", str(venv), "--json")
    (src3,) = json.loads(third.stdout)["sources"]
    assert src3["write"]["removed"] == 2  # the console script and the module (SCRIPT_SOURCE)
    with TrustDB.open(Path(cli_env["TRUSTDB_DB"])) as db:
        assert not db.records_for_path(f"{venv}/bin/tinypkg-hello")
