"""Fixtures for the engine tests: a fresh cgroup v2 per test (always removed), an engine scoped
to it (always detached), and helpers to run commands inside the cgroup.

Safety: the engine is only ever scoped to a cgroup created here; nothing outside it can be
denied. Every fixture cleans up in `finally`, whatever the test did.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import time
import uuid
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from trustdb.abi import Mode
from trustdb.backends.interface import EngineConfig, Scope
from trustdb.engine import Engine
from trustdb.first_seen import OpenTrust
from trustdb.model import InodeKey

CGROUP2 = Path(os.environ.get("TRUSTDB_CGROUP2", "/sys/fs/cgroup/unified"))
REPO = Path(__file__).resolve().parents[2]
OBJ = REPO / "build" / "bpf" / "tracepoint.bpf.o"


def _kill_and_remove(cg: Path) -> None:
    """Kill everything left in `cg` (and below), then remove the directories, deepest first."""
    if not cg.exists():
        return
    for _ in range(100):
        pids = []
        for procs in cg.rglob("cgroup.procs"):
            try:
                pids += [int(p) for p in procs.read_text().split()]
            except OSError:
                pass
        if not pids:
            break
        for pid in pids:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        time.sleep(0.02)
    for d in sorted((p for p in cg.rglob("*") if p.is_dir()), key=lambda p: -len(p.parts)):
        d.rmdir()
    cg.rmdir()


@pytest.fixture
def cgroup() -> Iterator[Path]:
    """A fresh cgroup v2 named trustdb-test-*, removed (with anything left in it) afterwards."""
    if os.geteuid() != 0:
        pytest.fail("engine tests need root (CI runs as root)")
    if not (CGROUP2 / "cgroup.procs").exists():
        pytest.fail(f"no cgroup v2 hierarchy at {CGROUP2}")
    cg = CGROUP2 / f"trustdb-test-{uuid.uuid4().hex[:10]}"
    cg.mkdir()
    try:
        yield cg
    finally:
        _kill_and_remove(cg)


@pytest.fixture(scope="session")
def bpf_object() -> Path:
    """The built tracepoint object (built once per session if missing or stale), or the one
    in $TRUSTDB_BPF_DIR (to test a build made elsewhere)."""
    if os.environ.get("TRUSTDB_BPF_DIR"):
        obj = Path(os.environ["TRUSTDB_BPF_DIR"]) / OBJ.name
    else:
        # Only this object: another backend's source may be mid-edit (or the tree read-only).
        subprocess.run(
            ["make", "-s", "-C", str(REPO / "bpf"), f"../build/bpf/{OBJ.name}"], check=True
        )
        obj = OBJ
    if not obj.is_file():
        pytest.fail(f"{obj} was not built")
    return obj


@dataclass
class Confined:
    """An engine scoped to one test cgroup, and ways to run things inside and outside it."""

    engine: Engine
    cgroup: Path

    def trust(self, paths: Iterable[str | os.PathLike[str]]) -> list[InodeKey]:
        keys = [InodeKey.from_stat(os.stat(p)) for p in paths]
        self.engine.trusted_inodes.add(keys)
        return keys

    def run(
        self, argv: list[str], *, confined: bool = True, timeout: float = 60, **kw: object
    ) -> subprocess.CompletedProcess[str]:
        """Run argv; when confined, an unconfined `sh` moves itself into the cgroup first and
        then execs argv, so only argv (and its descendants) are ever judged."""
        if confined:
            argv = [
                "/bin/sh",
                "-c",
                'echo $$ > "$0/cgroup.procs" && exec "$@"',
                str(self.cgroup),
                *argv,
            ]
        return subprocess.run(  # type: ignore[call-overload,no-any-return]
            argv, capture_output=True, text=True, timeout=timeout, check=False, **kw
        )


def libs_of(binary: str) -> list[str]:
    """The shared libraries `binary` loads, and ld.so, as ldd reports them (resolved)."""
    out = subprocess.run(["ldd", binary], capture_output=True, text=True, check=False).stdout
    libs: list[str] = []
    for line in out.splitlines():
        parts = line.split()
        for p in parts:
            if p.startswith("/"):
                libs.append(os.path.realpath(p))
    return libs


def closure(binaries: Iterable[str]) -> list[str]:
    """Binaries (resolved through PATH and symlinks) plus every library they load."""
    out: set[str] = set()
    for b in binaries:
        path = shutil.which(b) or b
        real = os.path.realpath(path)
        out.add(real)
        out.update(libs_of(real))
    return sorted(out)


def make_engine(
    cgroup: Path, bpf_object: Path, mode: Mode, *, first_seen: OpenTrust | None = None,
    **kw: object,
) -> Engine:
    """An engine on the tracepoint backend scoped to `cgroup`; `kw` go to EngineConfig."""
    from trustdb.backends.tracepoint import TracepointBackend

    kw.setdefault("max_entries", 1 << 16)
    config = EngineConfig(
        mode=mode,
        scope=Scope.for_cgroup(cgroup),
        **kw,  # type: ignore[arg-type]
    )
    return Engine(config, backend=TracepointBackend(objdir=bpf_object.parent),
                  first_seen=first_seen)


@pytest.fixture
def enforce(cgroup: Path, bpf_object: Path) -> Iterator[Confined]:
    """An enforcing engine scoped to `cgroup`, detached afterwards whatever happens."""
    engine = make_engine(cgroup, bpf_object, Mode.ENFORCE)
    with engine:
        yield Confined(engine, cgroup)


@pytest.fixture
def audit(cgroup: Path, bpf_object: Path) -> Iterator[Confined]:
    engine = make_engine(cgroup, bpf_object, Mode.AUDIT)
    with engine:
        yield Confined(engine, cgroup)
