"""Policies: the shipped files load, every error names file:line, unknown keys are errors, the
one-off additions of `run`, path expansion, the service's per-uid/per-cgroup modes, the CLI."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from trustdb.policy import load as policy
from trustdb.policy.model import Enforcement, FilesystemRules, NetworkMode, ScriptJudgement
from trustdb.policy.paths import resolve

REPO = Path(__file__).resolve().parents[2]
TRUSTDB = [sys.executable, "-c", "from trustdb.cli import main; main()"]


@pytest.mark.parametrize("name", ["agent", "build", "workstation"])
def test_shipped_policies_load(name: str) -> None:
    p = policy.load(name)
    assert p.name == name and p.source == str(REPO / "policies" / f"{name}.toml")
    assert p.description


def test_agent_defaults() -> None:
    p = policy.load()  # the default of run
    assert p.name == "agent" and p.mode == Enforcement.ENFORCE
    fs = p.filesystem
    assert fs.read_write == ("$WORKDIR",) and fs.private_tmp
    for secret in ("~/.ssh", "~/.gnupg", "~/.aws", "~/.config/gcloud", "~/.kube", "~/.netrc",
                   "~/.docker/config.json", "~/.*_history", "/home/*", "/root"):
        assert secret in fs.no_access
    for tree in ("/usr", "/lib", "/bin", "/sbin", "/etc", "/opt"):
        assert tree in fs.read_only
    assert p.jit == () and not p.trust_compiler_outputs
    assert p.network.mode == NetworkMode.PORTS and p.network.bind_tcp == ()
    assert p.interpreters.scripts == ScriptJudgement.TRUSTED
    assert policy.load("build").trust_compiler_outputs


def _bad(tmp_path: Path, text: str) -> str:
    f = tmp_path / "p.toml"
    f.write_text(text)
    with pytest.raises(policy.PolicyError) as e:
        policy.load(str(f))
    return str(e.value).replace(str(f), "FILE")


def test_errors_name_file_and_line(tmp_path: Path) -> None:
    assert _bad(tmp_path, "[policy]\nname = 'x'\n\n[filesystem]\nread_wirte = []\n") == (
        "FILE:5: unknown key 'filesystem.read_wirte' (known: no_access, private_tmp, protected, "
        "read_only, read_write)")
    assert _bad(tmp_path, "[polcy]\n").startswith("FILE:1: unknown key 'polcy'")
    assert _bad(tmp_path, "[network]\nmode = 'some'\n") == (
        "FILE:2: network.mode must be 'none' or 'ports' or 'all', not 'some'")
    assert _bad(tmp_path, "[network]\nmode = 'ports'\nconnect_tcp = [443, 70000]\n") == (
        "FILE:3: network.connect_tcp must be a list of TCP ports (1-65535)")
    assert _bad(tmp_path, "[network]\nconnect_tcp = [443]\n").startswith("FILE:1: ports are")
    assert _bad(tmp_path, "[filesystem]\nread_only = ['usr']\n") == (
        "FILE:2: 'usr': paths start with /, ~ or a $VARIABLE")
    assert "unknown variable $WORKDUR" in _bad(tmp_path, "[filesystem]\nread_only = ['$WORKDUR']\n")
    assert _bad(tmp_path, "[jit]\nprograms = ['node']\n") == (
        "FILE:2: 'node': name a program by absolute path or blake3:HEX")
    assert _bad(tmp_path, "[policy]\nmode = 'enforce'\nname = \n").startswith("FILE:3: ")
    assert _bad(tmp_path, "[service.uids]\nroot = 'audit'\n").startswith("FILE:2: service.uids")
    assert _bad(tmp_path, "[compilers]\ntrust_outputs = 'yes'\n") == (
        "FILE:2: compilers.trust_outputs must be true or false")


def test_missing_and_unknown(tmp_path: Path) -> None:
    with pytest.raises(policy.PolicyError, match="no policy named 'nope'"):
        policy.load("nope")
    with pytest.raises(policy.PolicyError, match="no such policy file"):
        policy.load(str(tmp_path / "x.toml"))
    f = tmp_path / "bin.toml"
    f.write_bytes(b"\xff\xfe")
    with pytest.raises(policy.PolicyError, match="cannot read"):
        policy.load(str(f))


def test_additions_and_digest(tmp_path: Path) -> None:
    p = policy.load("agent").with_additions(read=["/srv/x"], write=["/data"], jit=["/usr/bin/node"],
                                            audit=True)
    assert "/srv/x" in p.filesystem.read_only and "/data" in p.filesystem.read_write
    assert [str(j) for j in p.jit] == ["/usr/bin/node"] and p.mode == Enforcement.AUDIT
    f = tmp_path / "d.toml"
    f.write_text(f"[jit]\nprograms = ['blake3:{'ab' * 32}']\n")
    assert policy.load(str(f)).jit[0].digest == "ab" * 32


def test_service_modes(tmp_path: Path) -> None:
    f = tmp_path / "s.toml"
    f.write_text("[service]\nmode = 'enforce'\n[service.uids]\n'1000' = 'audit'\n"
                 "[service.cgroups]\n'/system.slice/ci.service' = 'audit'\n"
                 "'/system.slice' = 'enforce'\n")
    svc = policy.load(str(f)).service
    assert svc.mode_for(uid=0) == Enforcement.ENFORCE
    assert svc.mode_for(uid=1000) == Enforcement.AUDIT
    assert svc.mode_for(uid=1000, cgroup="/system.slice/x.service") == Enforcement.ENFORCE
    assert svc.mode_for(cgroup="/system.slice/ci.service/sub") == Enforcement.AUDIT


def test_paths_expand(tmp_path: Path) -> None:
    home = tmp_path / "home"
    (home / ".ssh").mkdir(parents=True)
    (home / ".bash_history").write_text("")
    (home / ".zsh_history").write_text("")
    work = tmp_path / "work"
    work.mkdir()
    rules = FilesystemRules(read_write=("$WORKDIR",), read_only=("~/missing",),
                                   no_access=("~/.ssh", "~/.*_history"))
    r = resolve(rules, str(work), homes=[str(home)])
    assert r.read_write == (str(work),)
    assert r.read_only == ()  # what does not exist is neither granted nor covered
    assert set(r.no_access) == {str(home / ".ssh"), str(home / ".bash_history"),
                                str(home / ".zsh_history")}


def _cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*TRUSTDB, *args], capture_output=True, text=True, timeout=60,
                          check=False)


def test_cli_list_show_check(tmp_path: Path) -> None:
    p = _cli("policy", "list")
    assert p.returncode == 0 and "agent" in p.stdout and "(default of run)" in p.stdout
    p = _cli("policy", "show", "agent", "--json")
    assert p.returncode == 0 and '"read_write": [\n      "$WORKDIR"' in p.stdout
    bad = tmp_path / "bad.toml"
    bad.write_text("[network]\nmode = 'none'\nports = [1]\n")
    p = _cli("policy", "check", str(REPO / "policies" / "agent.toml"), str(bad))
    assert p.returncode == 2
    assert "agent.toml: ok" in p.stdout
    assert p.stderr.strip() == f"trustdb: error: {bad}:3: unknown key 'network.ports' " \
        "(known: bind_tcp, connect_tcp, mode, udp)"
    assert _cli("policy", "show", "nope").returncode == 2
