"""Build the wheel, the .deb and the .rpm once per test session (each build takes a minute or
two), into one shared directory that an unprivileged user can read."""

from __future__ import annotations

import io
import os
import shutil
import subprocess
import tarfile
import tempfile
import zipfile
from collections.abc import Iterable, Iterator
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
VENDORED = "/usr/lib/trustdb/python/"
DEBIAN_PYTHON = "/usr/bin/python3"
"""Debian 12's own interpreter (3.11.2): the .deb's launcher runs on it."""


def shared_dir() -> Path:
    """A 0755 directory outside pytest's 0700 tmp root (non-root users read packages in it)."""
    d = Path(tempfile.mkdtemp(prefix="trustdb-pkg-"))
    d.chmod(0o755)
    return d


def build_wheel(out: Path) -> Path:
    subprocess.run(
        ["nice", "python3", "-m", "build", "-q", "--wheel", "--outdir", str(out), str(REPO)],
        check=True, capture_output=True,
    )
    (wheel,) = out.glob("trustdb-*.whl")
    return wheel


def build_package(kind: str, wheel: Path, out: Path) -> Path:
    """`kind` is deb or rpm: packaging/<kind>/build.sh, from the session's wheel."""
    done = subprocess.run(
        ["nice", "bash", str(REPO / f"packaging/{kind}/build.sh"), "--wheel", str(wheel), str(out)],
        check=True, capture_output=True, text=True,
    )
    return Path(done.stdout.strip().splitlines()[-1])


def summary(paths: Iterable[str]) -> list[str]:
    """A package's file list as packaging/*/files.txt pins it: every path, except inside the
    vendored tree, where only its top-level entries and the BPF objects are listed."""
    out = set()
    for raw in paths:
        p = "/" + raw.removeprefix(".").strip("/")
        if p == "/":
            continue
        if p.startswith(VENDORED):
            rest = p[len(VENDORED):]
            if ("/" in rest and not rest.startswith("trustdb/bpf/")) or rest == "__pycache__":
                continue
        out.add(p)
    return sorted(out)


def pinned(kind: str) -> list[str]:
    lines = (REPO / f"packaging/{kind}/files.txt").read_text().splitlines()
    return [x for x in lines if x and not x.startswith("#")]


def deb_paths(deb: Path) -> list[str]:
    tar = subprocess.run(["dpkg-deb", "--fsys-tarfile", str(deb)], check=True,
                         capture_output=True).stdout
    return tarfile.open(fileobj=io.BytesIO(tar)).getnames()


def rpm_paths(rpm: Path) -> list[str]:
    return subprocess.run(["rpm", "-qpl", str(rpm)], check=True, capture_output=True,
                          text=True).stdout.split()


def wheel_paths(wheel: Path) -> list[str]:
    with zipfile.ZipFile(wheel) as z:
        return z.namelist()


class Packages:
    """The session's packages, each built on first use: ["wheel"], ["deb"], ["rpm"], ["dir"]."""

    def __init__(self, out: Path) -> None:
        self._built: dict[str, Path] = {"dir": out}

    def __getitem__(self, kind: str) -> Path:
        if kind not in self._built:
            out = self._built["dir"]
            if kind == "wheel":
                self._built[kind] = build_wheel(out)
            else:
                self._built[kind] = build_package(kind, self["wheel"], out / kind)
        return self._built[kind]


@pytest.fixture(scope="session")
def packages() -> Iterator[Packages]:
    """The wheel, the .deb and the .rpm, each built once per session (when a test first asks),
    in a directory other users can read (registered for every test by tests/conftest.py)."""
    out = shared_dir()
    try:
        yield Packages(out)
    finally:
        shutil.rmtree(out, ignore_errors=True)


@pytest.fixture(scope="session")
def deb_tree(packages: Packages) -> Path:
    """The .deb's files unpacked (dpkg-deb -x) where any user can read them."""
    root = packages["dir"] / "unpacked"
    subprocess.run(["dpkg-deb", "-x", str(packages["deb"]), str(root)], check=True)
    root.chmod(0o755)
    return root


def launch(root: Path, *args: str, user: str | None = None,
           env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    """Run the packaged trustdb under `root` with Debian's python3 in isolated mode, as the
    launcher /usr/bin/trustdb does; optionally as another user (setpriv, no groups)."""
    code = (f"import sys; sys.path.insert(0, {str(root / 'usr/lib/trustdb/python')!r}); "
            "from trustdb.cli import main; main()")
    prefix = ["setpriv", f"--reuid={user}", f"--regid={user}", "--clear-groups"] if user else []
    clean = {k: v for k, v in (env or os.environ).items()
             if k not in ("PYTHONPATH", "TRUSTDB_BPF_DIR")}
    return subprocess.run([*prefix, DEBIAN_PYTHON, "-I", "-c", code, *args], cwd="/",
                          env=clean, capture_output=True, text=True, timeout=120, check=False)


def repin() -> None:
    """`python3 -m tests.packaging_build`: rewrite packaging/{deb,rpm}/files.txt from fresh
    builds (review the diff: it is what the packages install)."""
    out = shared_dir()
    wheel = build_wheel(out)
    for kind, paths in (("deb", deb_paths), ("rpm", rpm_paths)):
        pkg = build_package(kind, wheel, out / kind)
        path = REPO / f"packaging/{kind}/files.txt"
        header = [x for x in path.read_text().splitlines() if x.startswith("#")]
        path.write_text("\n".join([*header, *summary(paths(pkg))]) + "\n")
    print(out)


if __name__ == "__main__":
    os.environ.setdefault("SOURCE_DATE_EPOCH", "0")
    repin()
