"""The real `trustdb` command on real files and LMDB databases: verbs, exit codes, bad input,
kill -9 in the middle of a trust, a second writer, a full disk."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import lmdb
import pytest

NO_DAC = ["setpriv", "--inh-caps=-all", "--bounding-set=-dac_override,-dac_read_search", "--"]
"""Run as root without the capabilities that bypass file permissions (so mode 000 bites)."""

BIG_TREE = "/usr"
"""A real tree large enough that `trust --all-files` takes seconds (kill and busy tests)."""


def trustdb_cmd() -> list[str]:
    """The installed `trustdb` entry point (the one beside this interpreter, not a shim)."""
    beside = Path(sys.executable).parent / "trustdb"
    exe = str(beside) if beside.exists() else shutil.which("trustdb")
    if exe is None:
        pytest.fail("the trustdb command is not installed (pip install -e .)")
    return [exe]


def run(
    env: dict[str, str], *args: str, prefix: list[str] | None = None
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*(prefix or []), *trustdb_cmd(), *args],
        check=False,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )


def run_json(env: dict[str, str], *args: str) -> Any:
    out = run(env, *args, "--json")
    return json.loads(out.stdout)


def project(root: Path) -> Path:
    (root / "bin").mkdir(parents=True)
    tool = root / "bin" / "tool"
    tool.write_bytes(b"\x7fELF" + os.urandom(200))
    (root / "bin" / "run.sh").write_bytes(b"#!/bin/sh\nexec tool\n")
    (root / "README").write_bytes(b"not code")
    return root


def snapshot(env: dict[str, str]) -> tuple[Any, Any]:
    status = run_json(env, "status")
    return (status["generation"], status["entries"]), run_json(env, "list")


def test_trust_dir_then_check(tmp_path: Path, cli_env: dict[str, str]) -> None:
    root = project(tmp_path / "proj")
    out = run(cli_env, "trust", str(root))
    assert out.returncode == 0, out.stderr
    assert out.stdout.startswith(f"dir:{root}: 2 of 3 files recorded")
    ok = run(cli_env, "check", str(root / "bin" / "tool"))
    assert ok.returncode == 0
    assert ok.stdout.strip() == f"{root}/bin/tool: trusted: trusted by dir:{root}"

    (root / "bin" / "tool").write_bytes(b"\x7fELF tampered")
    (tmp_path / "stranger").write_bytes(b"#!/bin/sh\n")
    bad = run(cli_env, "check", str(root / "bin" / "tool"), str(tmp_path / "stranger"))
    assert bad.returncode == 1
    lines = bad.stdout.splitlines()
    assert "NOT TRUSTED: content changed since trusted at " in lines[0]
    assert lines[1].endswith("stranger: NOT TRUSTED: never trusted")
    verdicts = run_json(cli_env, "check", str(root))
    assert {(Path(v["path"]).name, v["trusted"], v["reason"]) for v in verdicts} == {
        ("tool", False, "changed"),
        ("run.sh", True, "trusted"),
    }


def test_sources_list_status_untrust(tmp_path: Path, cli_env: dict[str, str]) -> None:
    root = project(tmp_path / "proj")
    copy = tmp_path / "copy"
    copy.write_bytes((root / "bin" / "tool").read_bytes())
    assert run(cli_env, "trust", str(root)).returncode == 0
    assert run(cli_env, "trust", "--source", "ci:build", str(copy)).returncode == 0
    sources = {s["source"]: (s["kind"], s["entries"]) for s in run_json(cli_env, "sources")}
    assert sources == {f"dir:{root}": ("dir", 2), "ci:build": ("ci", 1)}
    listed = run_json(cli_env, "list", "--source", "ci:build")
    assert [r["path"] for r in listed] == [str(copy)]
    status = run_json(cli_env, "status")
    assert (status["schema"], status["entries"], status["contents"], status["sources"]) == (
        2,
        3,
        2,
        2,
    )
    assert status["database"] == cli_env["TRUSTDB_DB"] and status["size_on_disk"] > 0

    # removing one source leaves content the other still trusts
    assert run(cli_env, "untrust", "--source", f"dir:{root}").returncode == 0
    shared = run(cli_env, "check", str(root / "bin" / "tool"))
    assert shared.returncode == 0 and f"trusted by ci:build (as {copy})" in shared.stdout
    assert run(cli_env, "check", str(root / "bin" / "run.sh")).returncode == 1
    assert run(cli_env, "untrust", str(copy)).returncode == 0
    assert run(cli_env, "check", str(root / "bin" / "tool")).returncode == 1
    nothing = run(cli_env, "untrust", str(copy))
    assert nothing.returncode == 1 and "nothing recorded" in nothing.stderr


def test_verify_reports_missing_and_changed(tmp_path: Path, cli_env: dict[str, str]) -> None:
    root = project(tmp_path / "proj")
    assert run(cli_env, "trust", str(root)).returncode == 0
    assert run(cli_env, "verify").returncode == 0
    (root / "bin" / "run.sh").write_bytes(b"#!/bin/sh\nrm -rf ~\n")
    (root / "bin" / "tool").unlink()
    out = run(cli_env, "verify", "--source", f"dir:{root}", "--json")
    assert out.returncode == 1
    problems = {(Path(p["path"]).name, p["reason"]) for p in json.loads(out.stdout)["problems"]}
    assert problems == {("run.sh", "changed"), ("tool", "missing")}


def test_bad_input_is_reported_and_the_rest_recorded(
    tmp_path: Path, cli_env: dict[str, str]
) -> None:
    root = project(tmp_path / "proj")
    os.mkfifo(root / "bin" / "fifo")
    (root / "bin" / "loop").symlink_to(root / "bin" / "loop")
    out = run(
        cli_env, "trust", str(root / "bin"), str(root / "bin" / "loop"), str(tmp_path / "gone")
    )
    assert out.returncode == 3  # partial: the rest was recorded
    assert f"trustdb: {root}/bin/loop: symlink loop" in out.stderr.splitlines()
    assert f"trustdb: {tmp_path}/gone: no such file" in out.stderr.splitlines()
    assert "2 of 2 files recorded" in out.stdout and "FIFO (not read)" in out.stdout
    assert run(cli_env, "check", str(root / "bin" / "tool")).returncode == 0


@pytest.mark.root
def test_unreadable_file_fails_the_command_but_not_the_rest(
    tmp_path: Path, cli_env: dict[str, str], as_root: None
) -> None:
    root = project(tmp_path / "proj")
    (root / "bin" / "run.sh").chmod(0)
    out = run(cli_env, "trust", "--json", str(root), prefix=NO_DAC)
    assert out.returncode == 3, out.stderr
    summary = json.loads(out.stdout)
    assert summary["problems"] == [
        {"path": f"{root}/bin/run.sh", "reason": "unreadable (permission denied)"}
    ]
    assert summary["recorded"] == 1
    assert run(cli_env, "check", str(root / "bin" / "tool")).returncode == 0


def test_missing_db_and_schema_too_new(tmp_path: Path, cli_env: dict[str, str]) -> None:
    env = dict(cli_env, TRUSTDB_DB=str(tmp_path / "none"))
    out = run(env, "check", "/bin/sh")
    assert out.returncode == 4 and out.stderr.startswith("trustdb: error: no trust database at ")
    assert run(cli_env, "trust", "/bin/sh").returncode == 0
    lenv = lmdb.open(cli_env["TRUSTDB_DB"])
    with lenv.begin(write=True) as txn:
        txn.put(b"Mschema", (7).to_bytes(4, "big"))
    lenv.close()
    for verb in (["status"], ["trust", "/bin/ls"], ["check", "/bin/sh"]):
        out = run(cli_env, *verb)
        assert out.returncode == 7
        assert out.stderr.count("\n") == 1 and "has schema 7, newer than" in out.stderr


def start_big_trust(env: dict[str, str]) -> subprocess.Popen[str]:
    """`trust --all-files /usr` in the background; returns once it holds the writer lock
    (lock and write transaction are taken together and kept until the commit)."""
    proc = subprocess.Popen(
        [*trustdb_cmd(), "trust", "--all-files", "--source", "big", BIG_TREE],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        text=True,
    )
    lock = Path(env["TRUSTDB_DB"]) / "writer.lock"
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        if lock.exists() and f"pid {proc.pid}:" in lock.read_text():
            return proc
        time.sleep(0.01)
    proc.kill()
    pytest.fail("the background trust never took the writer lock")


def test_kill_9_mid_trust_leaves_db_as_before(tmp_path: Path, cli_env: dict[str, str]) -> None:
    root = project(tmp_path / "proj")
    assert run(cli_env, "trust", str(root)).returncode == 0
    before = snapshot(cli_env)
    proc = start_big_trust(cli_env)
    time.sleep(1.0)  # thousands of files hashed and written into the open transaction
    assert proc.poll() is None, "the big trust finished before it could be killed"
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert snapshot(cli_env) == before
    again = run(cli_env, "trust", "--source", "after", str(root / "bin" / "tool"))
    assert again.returncode == 0, again.stderr


def test_second_writer_fails_fast_readers_proceed(tmp_path: Path, cli_env: dict[str, str]) -> None:
    root = project(tmp_path / "proj")
    assert run(cli_env, "trust", str(root)).returncode == 0
    proc = start_big_trust(cli_env)
    try:
        second = run(cli_env, "trust", str(root / "bin" / "tool"))
        status = run(cli_env, "status")
        # Order, not time: both answered while the first writer still holds the lock, so
        # neither waited for it (a wall-clock bound broke under load).
        assert proc.poll() is None, "the first writer finished too early to test anything"
    finally:
        proc.kill()
        proc.wait()
    assert second.returncode == 6  # busy
    assert second.stderr.startswith(
        f"trustdb: error: another writer holds {cli_env['TRUSTDB_DB']} (pid {proc.pid}"
    )
    assert second.stderr.count("\n") == 1
    assert status.returncode == 0 and "entries: 2" in status.stdout


@pytest.mark.root
def test_full_disk_is_one_line_and_db_intact(tmp_path: Path, small_disk: Path) -> None:
    env = dict(os.environ, TRUSTDB_DB=str(small_disk / "db"))
    root = project(tmp_path / "proj")
    assert run(env, "trust", str(root)).returncode == 0
    before = snapshot(env)
    many = tmp_path / "many"
    many.mkdir()
    for i in range(6000):
        (many / f"f{i:05d}").write_bytes(b"#!/bin/sh\n# %d\n" % i)
    out = run(env, "trust", str(many))
    assert out.returncode == 7
    assert out.stderr.startswith("trustdb: error: disk full writing ")
    assert out.stderr.count("\n") == 1
    assert snapshot(env) == before
