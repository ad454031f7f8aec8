"""trustdb.confine.git_nested: the gitlink entries of real git indexes (versions 2, 3 and 4),
and which submodule entries are set aside (new since the start, or changed)."""

from __future__ import annotations

import os
import subprocess
import time
from pathlib import Path

import pytest

from trustdb.confine.git_nested import gitlinks, set_aside_changed_nested_repos, submodule_entries

GIT = ["git", "-c", "user.name=t", "-c", "user.email=t@t"]


def _repo_with_gitlinks(top: Path, names: list[str], *, init: bool = True) -> None:
    if init:
        subprocess.run([*GIT, "init", "-q", str(top)], check=True)
        (top / "a-file").write_text("x\n")
        subprocess.run([*GIT, "-C", str(top), "add", "a-file"], check=True)
    for name in names:
        subprocess.run([*GIT, "init", "-q", str(top / name)], check=True)
        subprocess.run([*GIT, "-C", str(top / name), "commit", "-q", "--allow-empty", "-m", "y"],
                       check=True)
        sha = subprocess.run([*GIT, "-C", str(top / name), "rev-parse", "HEAD"], check=True,
                             capture_output=True, text=True).stdout.strip()
        subprocess.run([*GIT, "-C", str(top), "update-index", "--add", "--cacheinfo",
                        f"160000,{sha},{name}"], check=True)


@pytest.mark.parametrize("version", ["2", "3", "4"])
def test_gitlinks_of_each_index_version(tmp_path: Path, version: str) -> None:
    names = ["dep", "dep-two", "vendor/deeper/lib"]
    _repo_with_gitlinks(tmp_path, names)
    subprocess.run([*GIT, "-C", str(tmp_path), "update-index", "--index-version", version],
                   check=True)
    assert sorted(gitlinks((tmp_path / ".git" / "index").read_bytes())) == names


def test_only_new_or_changed_entries_are_set_aside(tmp_path: Path) -> None:
    _repo_with_gitlinks(tmp_path, ["kept", "edited"])
    before = submodule_entries(str(tmp_path / ".git"))
    time.sleep(0.05)  # past the coarse-clock slack
    since = time.time_ns()
    time.sleep(0.05)
    with open(tmp_path / "edited" / ".git" / "config", "a") as f:
        f.write('[core]\n\tfsmonitor = "true"\n')
    subprocess.run([*GIT, "-C", str(tmp_path / "kept"), "status"], check=True,
                   capture_output=True)  # the agent using a submodule: kept
    _repo_with_gitlinks(tmp_path, ["new"], init=False)
    lines: list[str] = []
    moved = set_aside_changed_nested_repos(str(tmp_path / ".git"), since, before, lines.append)
    assert sorted(p.parent.name for p in moved) == ["edited", "new"], lines
    assert (tmp_path / "kept" / ".git").is_dir()
    assert not os.path.lexists(tmp_path / "new" / ".git")


def test_a_submodule_of_a_kept_submodule_is_judged_too(tmp_path: Path) -> None:
    """git status recurses: a repository planted in an unchanged submodule's own index is
    reached through it."""
    _repo_with_gitlinks(tmp_path, ["dep"])
    before = submodule_entries(str(tmp_path / ".git"))
    time.sleep(0.05)
    since = time.time_ns()
    _repo_with_gitlinks(tmp_path / "dep", ["evil"], init=False)
    moved = set_aside_changed_nested_repos(str(tmp_path / ".git"), since, before, print)
    assert [p.parent.name for p in moved] == ["evil"]
    assert (tmp_path / "dep" / ".git").is_dir()
