"""busybox, a trusted multi-call binary listed as an interpreter (agent policy), inside
`trustdb run` (tracepoint backend): it interprets only as its shell or awk applets.

`busybox cat x.sh` reading an untrusted script is not running it (a false denial before),
while `busybox sh x.sh`, `busybox ash x.sh` and a `sh` symlink to busybox are still refused.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

from tests.engine import test_run as base
from tests.engine.test_run import run_confined, workdir_of

pytestmark = [pytest.mark.root, pytest.mark.bpf]

BUSYBOX = "/usr/bin/busybox"
SCRIPT = "echo RAN-$((6*7))\n"
"""Read as data it shows `RAN-$((6*7))`; run, it prints RAN-42."""

run_env = base.run_env


@pytest.fixture(scope="module")
def busybox_db(tmp_path_factory: pytest.TempPathFactory) -> Path:
    if not os.path.isfile(BUSYBOX):
        pytest.fail(f"{BUSYBOX} missing (packaging/apt-packages.txt installs busybox-static)")
    import shutil

    db = tmp_path_factory.mktemp("multicall") / "db"
    tools = [shutil.which(t) for t in base.TOOLS]
    base.trust_files(db, base._closure([p for p in tools if p] + [sys.executable, BUSYBOX]))
    return db


def _plant(env: dict[str, str]) -> None:
    wd = workdir_of(env)
    (wd / "x.sh").write_text(SCRIPT)
    (wd / "cat").symlink_to(BUSYBOX)
    (wd / "sh").symlink_to(BUSYBOX)


def test_busybox_cat_reads_a_script(busybox_db: Path, run_env: dict[str, str]) -> None:
    _plant(run_env)
    got = run_confined(busybox_db, f"{BUSYBOX} cat x.sh; ./cat x.sh; {BUSYBOX} wc -l x.sh",
                       run_env)
    assert got.out.count("RAN-$((6*7))") == 2, (got.out, got.err)
    assert "1 x.sh" in got.out, (got.out, got.err)
    assert "denied" not in got.err, got.err


@pytest.mark.parametrize("command", [f"{BUSYBOX} sh x.sh", f"{BUSYBOX} ash x.sh", "./sh x.sh",
                                     f"{BUSYBOX} hush x.sh"])
def test_busybox_shell_still_refuses_the_script(busybox_db: Path, run_env: dict[str, str],
                                                command: str) -> None:
    _plant(run_env)
    got = run_confined(busybox_db, command, run_env)
    assert "RAN-42" not in got.out, (command, got.out, got.err)
