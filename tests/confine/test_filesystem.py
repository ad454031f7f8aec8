"""Filesystem and network confinement of `trustdb run` (issue 10, section 2): real attacks.

Each attack is tried unconfined first (it must work: the attempt is real), then inside the run,
where it must fail with EACCES/EPERM/EXDEV/EROFS or find nothing. The `lab` fixture plants an
"outside" directory on the same filesystem as the workdir, with a secret in it, and a fake
home whose ~/.ssh holds a key. Landlock (this host: ABI 7) through `trustdb run`; the mount
namespace fallback (no Landlock) through the confined child alone, without BPF.
"""

from __future__ import annotations

import os
import shutil
import socket
import sys
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.engine import test_run as base
from tests.engine.test_run import Outcome, run_confined, run_unconfined
from trustdb import confine
from trustdb.confine.filesystem import plan_for
from trustdb.policy import load as policy

pytestmark = [pytest.mark.root]

trusted_db = base.trusted_db
run_env = base.run_env
no_leftovers = base.no_leftovers

PY = sys.executable
SYSTEM = '["/usr", "/bin", "/sbin", "/lib", "/lib64", "/etc", "/proc", "/sys"]'


@dataclass
class Lab:
    work: Path
    outside: Path
    secret: Path
    home: Path
    key: Path
    policy: Path
    """agent-like, without the private /tmp: only Landlock keeps `outside` out of reach."""


@pytest.fixture
def lab(tmp_path: Path, run_env: dict[str, str]) -> Iterator[Lab]:
    work = base.workdir_of(run_env)
    outside = Path(f"/var/lib/trustdb-test-{uuid.uuid4().hex[:8]}")
    outside.mkdir()
    secret = outside / "secret"
    secret.write_text("s3cret\n")
    home = tmp_path / "home"
    (home / ".ssh").mkdir(parents=True)
    key = home / ".ssh" / "id_ed25519"
    key.write_text("PRIVATE KEY\n")
    pol = tmp_path / "lab.toml"
    pol.write_text(f'[filesystem]\nread_write = ["$WORKDIR"]\nread_only = {SYSTEM}\n'
                   'no_access = ["~/.ssh"]\nprivate_tmp = false\n[network]\nmode = "none"\n')
    try:
        yield Lab(work, outside, secret, home, key, pol)
    finally:
        shutil.rmtree(outside, ignore_errors=True)


def _in(db: Path, lab: Lab, script: str, env: dict[str, str], *extra: str) -> Outcome:
    return run_confined(db, script, env, "--policy", str(lab.policy), *extra)


def test_read_planted_secret(trusted_db: Path, run_env: dict[str, str], lab: Lab) -> None:
    script = f"cat {lab.secret}; echo rc=$?"
    assert run_unconfined(script, run_env).out == "s3cret\nrc=0\n"
    got = _in(trusted_db, lab, script, run_env)
    # Landlock refuses it, and the directory is covered too (nothing there is listed).
    assert got.out == "rc=1\n" and ("Permission denied" in got.err or
                                    "No such file" in got.err), got


def test_ssh_key_hidden_even_in_workdir(trusted_db: Path, run_env: dict[str, str],
                                        lab: Lab) -> None:
    """The worst case: the agent started in $HOME. ~/.ssh is covered (empty, read-only)."""
    env = dict(run_env, HOME=str(lab.home))
    script = (f"ls -A {lab.home}/.ssh | wc -l; cat {lab.key}; echo rc=$?; "
              f"echo x > {lab.home}/.ssh/authorized_keys; echo w=$?; echo ok > {lab.home}/f; "
              "echo home=$?")
    assert run_unconfined(f"cat {lab.key}", env).out == "PRIVATE KEY\n"
    for chosen in (str(lab.policy), "agent"):
        got = run_confined(trusted_db, script, env, "--policy", chosen, "--workdir",
                           str(lab.home))
        assert got.out.split() == ["0", "rc=1", "w=2", "home=0"], (chosen, got)
        assert "PRIVATE KEY" not in got.out
    assert not (lab.home / ".ssh" / "authorized_keys").exists()


def test_write_outside_workdir(trusted_db: Path, run_env: dict[str, str], lab: Lab) -> None:
    script = (f"echo x > {lab.outside}/new; echo out=$?; echo x > /usr/local/trustdb-x; "
              "echo usr=$?; echo x > new-in-workdir; echo in=$?")
    got = _in(trusted_db, lab, script, run_env)
    assert got.out.split() == ["out=2", "usr=2", "in=0"], got
    assert not (lab.outside / "new").exists() and not Path("/usr/local/trustdb-x").exists()


RENAME = (f"{PY} -c 'import os, sys\n"
          "try:\n os.rename(sys.argv[1], sys.argv[2]); print(\"moved\")\n"
          "except OSError as e: print(\"rename\", e.errno)' ")


def test_rename_out_of_workdir(trusted_db: Path, run_env: dict[str, str], lab: Lab,
                               tmp_path: Path) -> None:
    probe = tmp_path / "probe"
    probe.write_text("x")
    assert run_unconfined(f"{RENAME} {probe} {lab.outside}/probe", run_env).out == "moved\n"
    (lab.work / "mine").write_text("data")
    got = _in(trusted_db, lab, f"{RENAME} mine {lab.outside}/mine", run_env)
    assert got.out.split()[0] == "rename" and got.out.split()[1] in ("2", "13", "18"), got  # ENOENT/EACCES/EXDEV
    assert (lab.work / "mine").exists() and not (lab.outside / "mine").exists()


def test_symlink_out(trusted_db: Path, run_env: dict[str, str], lab: Lab) -> None:
    (lab.work / "link").symlink_to(lab.secret)
    assert run_unconfined(f"cat {lab.work}/link", run_env).out == "s3cret\n"
    got = _in(trusted_db, lab, "cat link; echo rc=$?; ln -sf /root/.profile l2; cat l2; "
              "echo rc2=$?", run_env)
    assert got.out.split() == ["rc=1", "rc2=1"], got


def test_hard_link_to_outside_file(trusted_db: Path, run_env: dict[str, str], lab: Lab) -> None:
    probe = lab.outside.parent / f"{lab.outside.name}-probe"
    try:
        assert run_unconfined(f"ln {lab.secret} {probe} && cat {probe}", run_env).out == "s3cret\n"
    finally:
        probe.unlink(missing_ok=True)
    link = (f"{PY} -c 'import os\ntry: os.link(\"{lab.secret}\", \"hl\"); print(\"linked\")\n"
            "except OSError as e: print(\"link\", e.errno)'")
    got = _in(trusted_db, lab, f"{link}; cat hl; echo cat=$?", run_env)
    assert got.out.split() in (["link", "18", "cat=1"], ["link", "13", "cat=1"],
                               ["link", "2", "cat=1"]), got  # ENOENT: covered


def test_proc_pid_root(trusted_db: Path, run_env: dict[str, str], lab: Lab) -> None:
    """/proc/PID/root of every process the tree can see (only its own: the host's and the
    supervisor's are in another PID namespace) leads to the same confined view."""
    script = (f"for p in /proc/[0-9]*; do cat $p/root{lab.secret} 2>/dev/null && echo LEAK $p; "
              "done; ls /proc | grep -c '^[0-9]'; echo done")
    got = _in(trusted_db, lab, script, run_env)
    assert "LEAK" not in got.out and got.out.split()[-1] == "done", got
    assert int(got.out.split()[-2]) < 10


def test_network_ports(trusted_db: Path, run_env: dict[str, str], lab: Lab) -> None:
    """network.mode = none: no TCP bind, no TCP connect (to a listener of this test, outside)."""
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(8)
    port = listener.getsockname()[1]
    code = (f"{PY} -c 'import socket\n"
            "for what in (\"bind\", \"connect\"):\n"
            " s = socket.socket()\n"
            " try:\n"
            f"  s.bind((\"127.0.0.1\", 0)) if what == \"bind\" else s.connect((\"127.0.0.1\", {port}))\n"
            "  print(what, \"ok\")\n"
            " except OSError as e: print(what, e.errno)'")
    try:
        assert run_unconfined(code, run_env).out.split() == ["bind", "ok", "connect", "ok"]
        got = _in(trusted_db, lab, code, run_env)
        assert got.out.split() == ["bind", "13", "connect", "13"], got  # EACCES
    finally:
        listener.close()


def test_abstract_unix_socket_scoped(trusted_db: Path, run_env: dict[str, str], lab: Lab) -> None:
    """Abstract unix sockets outside the tree (X11, D-Bus, ...) are out of reach (ABI 6)."""
    name = f"\0trustdb-test-{uuid.uuid4().hex[:8]}"
    server = socket.socket(socket.AF_UNIX)
    server.bind(name)
    server.listen(8)
    code = (f"{PY} -c 'import socket\ns = socket.socket(socket.AF_UNIX)\n"
            f"try: s.connect(\"\\0{name[1:]}\"); print(\"connected\")\n"
            "except OSError as e: print(\"connect\", e.errno)'")
    try:
        assert run_unconfined(code, run_env).out == "connected\n"
        got = _in(trusted_db, lab, code, run_env)
        assert got.out == "connect 1\n", got  # EPERM
    finally:
        server.close()


def test_landlock_cannot_be_widened_from_inside(trusted_db: Path, run_env: dict[str, str],
                                                lab: Lab) -> None:
    """A nested ruleset granting / only narrows: the secret stays unreadable."""
    code = (f"{PY} -c 'import sys; sys.path.insert(0, \"{base.workdir_of(run_env)}\")\n"
            "from trustdb.confine import landlock\n"
            "landlock.Ruleset(landlock.Rules(read_write=(\"/\",), scope_ipc=False)).enforce()\n"
            f"print(open(\"{lab.secret}\").read())'")
    got = _in(trusted_db, lab, f"{code}; echo rc=$?", run_env)
    assert "s3cret" not in got.out and "rc=1" in got.out, got


def test_mechanism_named_once(trusted_db: Path, run_env: dict[str, str]) -> None:
    got = run_confined(trusted_db, "true", run_env)
    lines = [ln for ln in got.err.splitlines() if ln.startswith("trustdb: policy agent;")]
    assert len(lines) == 1 and "filesystem: Landlock ABI" in lines[0], got


# --- without Landlock: the mount namespace alone -----------------------------------------------


def test_mount_fallback(lab: Lab, tmp_path: Path, run_env: dict[str, str],
                        monkeypatch: pytest.MonkeyPatch) -> None:
    """Same lab, Landlock off (abi=0): what the policy lists nothing of is covered, ~/.ssh is,
    the workdir is writable, the DB is hidden. No BPF: the child alone."""
    db = tmp_path / "db"
    db.mkdir()
    (db / "data.mdb").write_text("db")
    pol = policy.load(str(lab.policy))
    monkeypatch.setenv("HOME", str(lab.home))
    monkeypatch.delenv("SUDO_USER", raising=False)
    setup = plan_for(pol, db, str(lab.home), abi=0)
    assert "mount namespace" in setup.mechanism
    out = lab.home / "fallback.out"
    script = (f"cd {lab.home}; cat {lab.key}; echo key=$?; ls -A {lab.home}/.ssh | wc -l; "
              f"cat {lab.secret}; echo x > {lab.outside}/new; echo out=$?; "
              f"echo x > {lab.home}/f; echo home=$?; echo x > /tmp/t; echo tmp=$?; "
              f"ls -A {db} | wc -l; echo x > /usr/local/trustdb-x; echo usr=$?")
    cg = confine.RunCgroup.create()
    try:
        env = dict(os.environ, HOME=str(lab.home))
        child = confine.spawn(["sh", "-c", f"exec >{out} 2>&1; {script}"], cg, setup.plan,
                              env, confine.ExecSetup(filesystem=None, cwd=str(lab.home)))
        child.release()
        assert child.wait() == 0
        child.close()
        text = out.read_text().split()
    finally:
        cg.remove()
    assert "PRIVATE" not in text and "key=1" in text, text
    assert text[text.index("key=1") + 1] == "0", text
    assert "s3cret" not in text  # covered: the policy lists nothing of it (MountPlan.unlisted)
    # (this lab policy has no private /tmp: /tmp is read-only like the rest)
    assert "out=2" in text and "home=0" in text and "tmp=2" in text and "usr=2" in text, text
    # The DB directory is covered: shown empty, or, when /tmp has more entries than
    # MAX_COVERS_PER_DIR and is covered whole, not there at all.
    assert text[text.index("tmp=2") + 1] in ("0", "ls:"), text
    assert not (lab.outside / "new").exists() and (lab.home / "f").exists()


def test_workdir_holding_system_trees_refused(trusted_db: Path, run_env: dict[str, str]) -> None:
    """`cd / && trustdb run` would make the whole system the writable workdir: refused."""
    got = run_confined(trusted_db, "true", run_env, "--workdir", "/")
    assert got.code == 7 and "holds system trees" in got.err, got  # ExitCode.FAILED


def test_mount_fallback_agent_keeps_the_interpreter(tmp_path: Path) -> None:
    """agent without Landlock covers /root and /home; the interpreter and trustdb's own
    install below them (a pyenv under /root here) are re-attached, nested ones once."""
    work = tmp_path / "work"
    work.mkdir()
    out = work / "out"
    setup = plan_for(policy.load("agent"), tmp_path / "db", str(work), abi=0)
    cg = confine.RunCgroup.create()
    try:
        child = confine.spawn(["sh", "-c", f"{PY} -c 'print(42)' > {out} 2>&1"], cg, setup.plan,
                              dict(os.environ), confine.ExecSetup(cwd=str(work)))
        child.release()
        assert child.wait() == 0, out.read_text() if out.exists() else ""
        child.close()
    finally:
        cg.remove()
    assert out.read_text() == "42\n"


def test_workdir_git_config_and_hooks_protected(trusted_db: Path, run_env: dict[str, str],
                                               lab: Lab) -> None:
    """The user's own git would run a planted core.fsmonitor or hook at the next `git status`
    outside the run: .git/config and .git/hooks are read-only inside, and .git itself is a
    mount point (it cannot be renamed away and replaced). The rest of the repo stays writable."""
    git = shutil.which("git") or "git"
    work = lab.work
    assert os.system(f"{git} init -q {work}") == 0
    script = ("echo '[core]' >> .git/config; echo config=$?; "
              "echo x > .git/hooks/pre-commit; echo hook=$?; "
              f"{PY} -c 'import os\ntry: os.rename(\".git\", \".git-old\"); print(\"moved\")\n"
              "except OSError as e: print(\"rename\", e.errno)'; "
              "echo x > .git/description; echo desc=$?; echo y > file; echo file=$?")
    got = run_confined(trusted_db, script, run_env)
    words = got.out.split()
    assert words[:2] == ["config=2", "hook=2"], got
    assert words[2:4] == ["rename", "16"], got  # EBUSY: a mount point
    assert words[4:] == ["desc=0", "file=0"], got
    assert (work / ".git").is_dir() and "[core]\n[core]" not in (work / ".git/config").read_text()
