"""A git repository the confined tree creates itself (`git init`, `git init --bare`, a `.git`
file pointing at a git directory of its own) carries the tree's config and hooks, which the
user's next unconfined git command there would run. Inside `trustdb run` (tracepoint backend):
when the run ends, each new one is handed to nobody, and the user's git refuses it (dubious
ownership) before reading its config; the user's own repositories are untouched.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.engine import test_run as base
from tests.engine.test_run import run_confined, workdir_of

pytestmark = [pytest.mark.root, pytest.mark.bpf]

run_env = base.run_env
FSMONITOR = "printf '[core]\\n\\tfsmonitor = \"touch {marker}; false\"\\n' >> {config}"


@pytest.fixture(scope="module")
def git_db(tmp_path_factory: pytest.TempPathFactory) -> Path:
    git = shutil.which("git")
    if git is None:
        pytest.fail("git is missing (packaging/apt-packages.txt installs it)")
    db = tmp_path_factory.mktemp("new-repos") / "db"
    tools = [shutil.which(t) for t in (*base.TOOLS, "mkdir", "chmod")]
    base.trust_files(db, base._closure([p for p in tools if p] + [sys.executable, git]))
    return db


def _user_git(repo: Path, *args: str) -> subprocess.CompletedProcess[str]:
    """What the user runs next, outside any run."""
    return subprocess.run(["git", "-C", str(repo), *args], capture_output=True, text=True,
                          check=False, timeout=30)


def test_git_init_inside_is_refused_by_the_users_git(git_db: Path,
                                                     run_env: dict[str, str]) -> None:
    wd = workdir_of(run_env)
    marker = wd / "ran-outside"
    script = ("git init -q sub && " + FSMONITOR.format(marker=marker, config="sub/.git/config")
              + " && printf '#!/bin/sh\\ntouch " + str(marker) + "\\n' > sub/.git/hooks/"
              "post-checkout && chmod +x sub/.git/hooks/post-checkout && echo made")
    got = run_confined(git_db, script, run_env)
    assert "made" in got.out, (got.out, got.err)
    assert "is a git repository the confined tree created" in got.err, got.err
    r = _user_git(wd / "sub", "status", "--short")
    assert not marker.exists(), "the user's git status ran the tree's fsmonitor"
    assert r.returncode != 0 and "dubious ownership" in r.stderr, r.stderr
    assert (wd / "sub" / ".git").stat().st_uid == 65534


def test_bare_repository_and_git_file_inside(git_db: Path, run_env: dict[str, str]) -> None:
    wd = workdir_of(run_env)
    script = ("git init -q --bare bare.git && mkdir linked && "
              "printf 'gitdir: ../bare.git\\n' > linked/.git && echo made")
    got = run_confined(git_db, script, run_env)
    assert "made" in got.out, (got.out, got.err)
    for repo in (wd / "bare.git", wd / "linked"):
        r = _user_git(repo, "rev-parse", "--git-dir")
        assert r.returncode != 0 and "dubious ownership" in r.stderr, (repo, r.stderr)


def test_the_users_own_repositories_are_untouched(git_db: Path,
                                                  run_env: dict[str, str]) -> None:
    wd = workdir_of(run_env)
    subprocess.run(["git", "init", "-q", str(wd)], check=True)
    subprocess.run(["git", "init", "-q", str(wd / "nested")], check=True)
    owner = os.lstat(wd / "nested" / ".git").st_uid
    got = run_confined(git_db, "git status --short >/dev/null; echo ok", run_env)
    assert "ok" in got.out, (got.out, got.err)
    assert "confined tree created" not in got.err, got.err
    assert os.lstat(wd / "nested" / ".git").st_uid == owner
    assert _user_git(wd / "nested", "status", "--short").returncode == 0
    assert _user_git(wd, "status", "--short").returncode == 0
