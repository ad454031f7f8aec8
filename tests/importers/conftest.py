"""Real package data for the importer tests, built by the real tools.

- `rpm_files`: .rpm packages built by `rpmbuild` (zstd, gzip and xz payloads), plus a copy of
  the zstd one cut in the middle of its payload.
- `rpm_root`: those packages installed by `rpm --root DIR -i --nodeps` into a fresh root with
  a real sqlite rpmdb.
- `deb_root`: .debs built by `dpkg-deb --build` and installed by `dpkg --root DIR` (both with
  a conffile script; `nomd5` ships no md5sums, so dpkg computes them at unpack).
- `venv`: a venv made by `python -m venv`, with a small local project installed by pip.

Session-scoped builds are copied per test (`cp -a`), so a test may tamper with its own copy.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest
from trustdb_importers.interface import Importer, NoCache

from trustdb.model import SkippedEntry, TrustEntry

ELF_SOURCE = Path("/usr/bin/true")
"""A real ELF executable to ship in the test packages."""
SCRIPT = b"#!/bin/sh\necho hello\n"
HOOK = b"#!/bin/sh\nexit 0\n"


def run_tool(*cmd: str | Path, cwd: Path | None = None) -> None:
    result = subprocess.run(
        [str(c) for c in cmd], cwd=cwd, capture_output=True, text=True, check=False
    )
    if result.returncode != 0:
        pytest.fail(f"{' '.join(map(str, cmd))} failed:\n{result.stdout}\n{result.stderr}")


def collect_all(importer: Importer) -> tuple[dict[str, TrustEntry], list[SkippedEntry]]:
    """Run an importer without a database: (trusted entries by path, skipped entries)."""
    entries: dict[str, TrustEntry] = {}
    skipped: list[SkippedEntry] = []
    for item in importer.collect(NoCache()):
        if isinstance(item, TrustEntry):
            entries[item.path] = item
        elif isinstance(item, SkippedEntry):
            skipped.append(item)  # (part markers, for the database, are not results)
    return entries, skipped


def trustdb(env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    """Run the real `trustdb` command (as installed: the package's entry point)."""
    cmd = [sys.executable, "-c", "from trustdb.cli import main; main()", *args]
    return subprocess.run(cmd, env=env, capture_output=True, text=True, check=False)


def _need(tool: str) -> None:
    if shutil.which(tool) is None:
        # CI installs these (packaging/apt-packages.txt); their absence is a broken setup.
        pytest.fail(f"{tool} is not installed (see packaging/apt-packages.txt)")


def _copy(src: Path, dst: Path) -> Path:
    run_tool("cp", "-a", src, dst)
    return dst


# --- rpm -----------------------------------------------------------------------------------

SPEC = """\
Name: {name}
Version: 1.0
Release: 1
Epoch: 2
Summary: trustdb test package
License: MIT
%global debug_package %{{nil}}
%global __os_install_post %{{nil}}
%global _build_id_links none
%description
trustdb test package
%install
mkdir -p %{{buildroot}}/usr/bin %{{buildroot}}/usr/share/doc/{name} %{{buildroot}}/usr/lib/{name}
mkdir -p %{{buildroot}}/etc/{name}
install -m 755 %{{_sourcedir}}/hook %{{buildroot}}/etc/{name}/hook
install -m 755 %{{_sourcedir}}/elf %{{buildroot}}/usr/bin/{name}
install -m 755 %{{_sourcedir}}/script %{{buildroot}}/usr/bin/{name}-script
install -m 644 %{{_sourcedir}}/elf %{{buildroot}}/usr/lib/{name}/lib{name}.so
install -m 644 %{{_sourcedir}}/README %{{buildroot}}/usr/share/doc/{name}/README
ln -s {name} %{{buildroot}}/usr/bin/{name}-link
%files
/usr/bin/{name}
/usr/bin/{name}-script
/usr/bin/{name}-link
/usr/lib/{name}
%config /etc/{name}/hook
%doc /usr/share/doc/{name}/README
"""

PAYLOADS = {"zstd": "w19.zstdio", "gzip": "w9.gzdio", "xz": "w6.xzdio"}


@dataclass(frozen=True)
class RpmFiles:
    packages: dict[str, Path]
    """Payload compressor -> package `hello` built with it."""
    other: Path
    """A second package (`other`, zstd) to install beside `hello`."""
    truncated: Path
    """The zstd `hello` cut in the middle of its payload."""
    sha512: Path
    """Package `wide`, whose file digests are SHA-512 (RPMTAG_FILEDIGESTALGO 10)."""


def _rpmbuild(top: Path, name: str, payload: str, *defines: str) -> Path:
    src = top / "src"
    src.mkdir(parents=True, exist_ok=True)
    shutil.copy(ELF_SOURCE, src / "elf")
    (src / "script").write_bytes(SCRIPT)
    (src / "README").write_text("documentation\n")
    (src / "hook").write_bytes(HOOK)
    spec = top / f"{name}.spec"
    spec.write_text(SPEC.format(name=name))
    run_tool(
        "rpmbuild", "-bb", "--quiet",
        "--define", f"_topdir {top}",
        "--define", f"_sourcedir {src}",
        "--define", f"_binary_payload {payload}",
        *defines,
        spec,
    )  # fmt: skip
    (built,) = (top / "RPMS").rglob(f"{name}-1.0-1.*.rpm")
    return built


@pytest.fixture(scope="session")
def rpm_files(tmp_path_factory: pytest.TempPathFactory) -> RpmFiles:
    _need("rpmbuild")
    base = tmp_path_factory.mktemp("rpms")
    packages = {}
    for compressor, macro in PAYLOADS.items():
        built = _rpmbuild(base / compressor, "hello", macro)
        packages[compressor] = built.rename(base / f"hello-{compressor}.rpm")
    other = _rpmbuild(base / "other", "other", PAYLOADS["zstd"])
    truncated = base / "hello-truncated.rpm"
    data = packages["zstd"].read_bytes()
    truncated.write_bytes(data[: len(data) - len(data) // 3])
    sha512 = _rpmbuild(
        base / "wide", "wide", PAYLOADS["gzip"], "--define", "_binary_filedigest_algorithm 10"
    )
    return RpmFiles(packages=packages, other=other, truncated=truncated, sha512=sha512)


@pytest.fixture(scope="session")
def _rpm_root_built(tmp_path_factory: pytest.TempPathFactory, rpm_files: RpmFiles) -> Path:
    _need("rpm")
    root = tmp_path_factory.mktemp("rpmroot") / "root"
    root.mkdir()
    run_tool(
        "rpm", "--root", root, "--dbpath", "/var/lib/rpm",
        "--define", "_db_backend sqlite",
        "-i", "--nodeps", "--nosignature", "--noscripts",
        rpm_files.packages["zstd"], rpm_files.other,
    )  # fmt: skip
    assert (root / "var/lib/rpm/rpmdb.sqlite").exists()
    return root


@pytest.fixture
def rpm_root(_rpm_root_built: Path, tmp_path: Path) -> Path:
    """A root with `hello` and `other` installed by rpm (this test's own copy)."""
    return _copy(_rpm_root_built, tmp_path / "root")


# --- deb -----------------------------------------------------------------------------------

CONTROL = """\
Package: {name}
Version: 1.0-1
Architecture: amd64
Maintainer: trustdb tests <tests@trustdb.invalid>
Description: trustdb test package
"""


def _dpkg_deb(base: Path, name: str, *, md5sums: bool) -> Path:
    tree = base / name
    (tree / "DEBIAN").mkdir(parents=True)
    (tree / "usr/bin").mkdir(parents=True)
    (tree / f"usr/share/doc/{name}").mkdir(parents=True)
    (tree / f"usr/lib/{name}").mkdir(parents=True)
    (tree / f"etc/{name}").mkdir(parents=True)
    shutil.copy(ELF_SOURCE, tree / f"usr/bin/{name}")
    (tree / f"usr/bin/{name}-script").write_bytes(SCRIPT)
    (tree / f"usr/bin/{name}-script").chmod(0o755)
    shutil.copy(ELF_SOURCE, tree / f"usr/lib/{name}/lib{name}.so")
    (tree / f"usr/lib/{name}/lib{name}.so").chmod(0o644)
    (tree / f"usr/share/doc/{name}/README").write_text("documentation\n")
    (tree / f"etc/{name}/hook").write_bytes(HOOK)
    (tree / f"etc/{name}/hook").chmod(0o755)
    (tree / "DEBIAN/control").write_text(CONTROL.format(name=name))
    (tree / "DEBIAN/conffiles").write_text(f"/etc/{name}/hook\n")
    if md5sums:
        # What dh_md5sums does: md5sum of every file under usr/, paths relative to the root.
        files = sorted(str(p.relative_to(tree)) for p in (tree / "usr").rglob("*") if p.is_file())
        out = subprocess.run(["md5sum", *files], cwd=tree, capture_output=True, check=True)
        (tree / "DEBIAN/md5sums").write_bytes(out.stdout)
    deb = base / f"{name}_1.0-1_amd64.deb"
    run_tool("dpkg-deb", "--root-owner-group", "--build", tree, deb)
    return deb


def dpkg(root: Path, *args: str | Path) -> None:
    """Run the real dpkg against a test root (no chroot, no root ownership needed)."""
    run_tool(
        "dpkg", f"--root={root}", "--force-not-root", "--force-script-chrootless",
        "--force-unsafe-io", "--log=/dev/null", *args,
    )  # fmt: skip


@pytest.fixture(scope="session")
def deb_files(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    _need("dpkg-deb")
    base = tmp_path_factory.mktemp("debs")
    return {
        "hello": _dpkg_deb(base, "hello", md5sums=True),
        "nomd5": _dpkg_deb(base, "nomd5", md5sums=False),
    }


@pytest.fixture(scope="session")
def _deb_root_built(tmp_path_factory: pytest.TempPathFactory, deb_files: dict[str, Path]) -> Path:
    _need("dpkg")
    root = tmp_path_factory.mktemp("debroot") / "root"
    admin = root / "var/lib/dpkg"
    for sub in ("info", "updates", "triggers"):
        (admin / sub).mkdir(parents=True)
    (admin / "status").touch()
    dpkg(root, "-i", deb_files["hello"], deb_files["nomd5"])
    return root


@pytest.fixture
def deb_root(_deb_root_built: Path, tmp_path: Path) -> Path:
    """A root with `hello` (with md5sums) and `nomd5` installed by dpkg (this test's copy)."""
    return _copy(_deb_root_built, tmp_path / "root")


# --- python --------------------------------------------------------------------------------

PYPROJECT = """\
[build-system]
requires = ["setuptools>=61"]
build-backend = "setuptools.build_meta"

[project]
name = "tinypkg"
version = "0.1"

[project.scripts]
tinypkg-hello = "tinypkg:main"

[tool.setuptools]
packages = ["tinypkg"]
"""


@pytest.fixture(scope="session")
def _venv_built(tmp_path_factory: pytest.TempPathFactory) -> Path:
    base = tmp_path_factory.mktemp("python")
    project = base / "tinypkg"
    (project / "tinypkg").mkdir(parents=True)
    (project / "pyproject.toml").write_text(PYPROJECT)
    (project / "tinypkg/__init__.py").write_text("def main() -> None:\n    print('hello')\n")
    venv = base / "venv"
    run_tool(sys.executable, "-m", "venv", venv)
    # pip builds the project (fetching setuptools from its index) and writes the real RECORD.
    run_tool(venv / "bin/pip", "install", "-q", "--no-deps", "--disable-pip-version-check", project)
    return venv


@pytest.fixture
def venv(_venv_built: Path, tmp_path: Path) -> Path:
    """A venv with `tinypkg==0.1` (console script `tinypkg-hello`) installed by pip."""
    return _copy(_venv_built, tmp_path / "venv")
