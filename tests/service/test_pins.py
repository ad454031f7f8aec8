"""The pin record and removal, on a plain directory: nothing is pinned on the host (pinning and
adopting for real run in the guest: tests/vm/guest_service.py)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from trustdb.service.pins import PinError, PinRecord, PinStore


def _store(tmp_path: Path) -> PinStore:
    return PinStore(root=tmp_path / "bpf" / "trustdb", run_dir=tmp_path / "run")


def test_refuses_a_directory_that_is_not_bpffs(tmp_path: Path) -> None:
    (tmp_path / "bpf").mkdir()
    with pytest.raises(PinError, match="not a bpf filesystem"):
        _store(tmp_path).new_instance()


def test_record_needs_its_pins(tmp_path: Path) -> None:
    store = _store(tmp_path)
    rec = PinRecord("i1", "lsm", "enforce", "ab" * 32, 7, 1.0, 42)
    store.write(rec)
    assert store.current() is None  # no links pinned: not adoptable
    links = store.instance_dir("i1") / "links"
    links.mkdir(parents=True)
    (links / "handle_exec").touch()
    assert store.current() == rec


def test_unpin_all_removes_every_instance_and_the_record(tmp_path: Path) -> None:
    store = _store(tmp_path)
    for i in ("i1", "i2"):
        for sub in ("links", "maps"):
            d = store.instance_dir(i) / sub
            d.mkdir(parents=True)
            (d / "x").touch()
    store.write(PinRecord("i2", "lsm", "enforce", "", 0, 0.0))
    assert store.remove_others(keep="i2") == ["i1"]
    assert store.instances() == ["i2"]
    assert store.unpin_all() == ["i2"]
    assert not store.root.exists() and not store.record_path.exists()


@pytest.mark.root
def test_exec_stop_after_a_crash_keeps_the_pins(tmp_path: Path, as_root: None) -> None:
    """systemd runs ExecStop after a crash too, with MAINPID unset: unpinning there would fail
    open until the restart."""
    env = {**os.environ, "TRUSTDB_RUN_DIR": str(tmp_path / "run"),
           "TRUSTDB_PIN_DIR": str(tmp_path / "pins")}
    env.pop("MAINPID", None)
    r = subprocess.run([sys.executable, "-c", "from trustdb.cli import main; main()",
                        "service", "stop", "--from-unit"], env=env, capture_output=True,
                       text=True, check=False)
    assert r.returncode == 0 and "pins stay" in r.stdout, r.stdout + r.stderr
