"""`trustdb why` on real files, a real process and logged decisions; `trustdb log` filters."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from tests.cli.test_schemas import validate
from tests.test_cli_db import run

DENIAL = (
    '{{"time":"{time}","verdict":"{verdict}","hook":"{hook}","reason":"not in the trust database",'
    '"path":"{path}","dev":"0:42","ino":7,"pid":{pid},"tgid":{pid},"ppid":1,"uid":0,'
    '"comm":"x","exe":"{exe}","mode":"enforce","backend":"tracepoint"}}'
)


def decision(path: str, *, time: str = "2026-12-01T20:00:00.000000Z", verdict: str = "deny",
             hook: str = "exec", pid: int = 5, exe: str = "/usr/bin/x") -> str:
    return DENIAL.format(path=path, time=time, verdict=verdict, hook=hook, pid=pid, exe=exe)


def test_why_a_rebuilt_file_names_its_build_dir(tmp_path: Path, cli_env: dict[str, str]) -> None:
    proj = tmp_path / "proj"
    proj.mkdir()
    tool = proj / "tool"
    shutil.copy("/bin/true", tool)
    assert run(cli_env, "trust", str(proj)).returncode == 0
    with tool.open("ab") as f:
        f.write(b"\0rebuilt")
    out = run(cli_env, "why", str(tool))
    assert out.returncode == 1
    assert "content changed since trusted" in out.stdout
    assert f"nearest (same path): {tool} by dir:{proj}" in out.stdout
    assert f"to allow:   trustdb trust {proj}" in out.stdout
    doc = json.loads(run(cli_env, "why", "--json", str(tool)).stdout)
    validate("why", doc)
    (f,) = doc["files"]
    assert f["fix"] == f"trustdb trust {proj}" and f["key"]["ino"] == tool.stat().st_ino
    # The fix works: after it, why says trusted and exits 0.
    assert run(cli_env, *f["fix"].split()[1:]).returncode == 0
    assert run(cli_env, "why", str(tool)).returncode == 0


def test_why_a_stranger_names_the_same_file_name(tmp_path: Path, cli_env: dict[str, str]) -> None:
    assert run(cli_env, "trust", "/bin/true").returncode == 0
    stranger = tmp_path / "true"
    stranger.write_bytes(Path("/bin/true").read_bytes() + b"\0")
    out = run(cli_env, "why", str(stranger))
    assert out.returncode == 1 and "never trusted" in out.stdout
    assert "nearest (same name): /usr/bin/true by manual" in out.stdout


def test_why_a_process_explains_every_executable_mapping(cli_env: dict[str, str]) -> None:
    import os

    assert run(cli_env, "trust", os.path.realpath("/proc/self/exe")).returncode == 0
    out = run(cli_env, "why", "--json", str(os.getpid()))
    doc = json.loads(out.stdout)
    validate("why", doc)
    paths = [f["path"] for f in doc["files"]]
    assert paths[0] == os.path.realpath(f"/proc/{os.getpid()}/exe")
    assert any("ld-linux" in p for p in paths)  # the loader is mapped executable


def test_why_event_uses_the_logged_decision(tmp_path: Path, cli_env: dict[str, str]) -> None:
    assert run(cli_env, "trust", "/bin/true").returncode == 0
    target = tmp_path / "x"
    target.write_bytes(b"#!/bin/sh\n")
    log = tmp_path / "decisions.jsonl"
    log.write_text(decision("/usr/bin/true", verdict="allow") + "\n" + decision(str(target)) + "\n")
    last = run(cli_env, "why", "event:-1", "--file", str(log))
    assert last.returncode == 1
    assert last.stdout.startswith(f"decision: deny exec of {target}")
    assert "note:" in last.stdout and "it was replaced since the decision" in last.stdout
    first = run(cli_env, "why", "event:1", "--file", str(log), "--json")
    assert first.returncode == 0 and json.loads(first.stdout)["files"][0]["trusted"]
    assert run(cli_env, "why", "event:9", "--file", str(log)).returncode == 1


def test_log_filters(tmp_path: Path, cli_env: dict[str, str]) -> None:
    log = tmp_path / "decisions.jsonl"
    log.write_text("\n".join([
        decision("/tmp/a", time="2026-12-01T10:00:00.000000Z", verdict="allow"),
        decision("/tmp/b", time="2026-12-01T11:00:00.000000Z", hook="mmap", pid=7),
        decision("/opt/c", time="2026-12-01T12:00:00.000000Z", exe="/usr/bin/python3"),
    ]) + "\n")

    def paths(*args: str) -> list[str]:
        out = run(cli_env, "log", "--json", "--file", str(log), *args)
        assert out.returncode == 0, out.stderr
        return [json.loads(x)["path"] for x in out.stdout.splitlines()]

    assert paths() == ["/tmp/a", "/tmp/b", "/opt/c"]
    assert paths("--denied") == ["/tmp/b", "/opt/c"]
    assert paths("--since", "2026-12-01T10:30:00Z", "--until", "2026-12-01T11:30:00Z") == ["/tmp/b"]
    assert paths("--path", "/tmp/*") == ["/tmp/a", "/tmp/b"]
    assert paths("--pid", "7") == ["/tmp/b"]
    assert paths("--exe", "/usr/bin/py*") == ["/opt/c"]
    assert paths("--hook", "mmap") == ["/tmp/b"]
    assert paths("--since", "1h") == []  # ages count back from now (the records are older)
    bad = run(cli_env, "log", "--file", str(log), "--since", "yesterday")
    assert bad.returncode == 2 and bad.stderr.count("\n") == 1
