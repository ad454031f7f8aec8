"""A way out through files the user's own tools run later, outside the tree: the workdir's git
hooks and git config (core.fsmonitor, core.pager, aliases run commands on every `git status`).
The agent policy grants the workdir read-write as a whole, so the tree plants them and the
user's next unconfined `git status` in that directory runs untrusted code with no trustdb
around it. Anthropic's sandbox-runtime denies writes to these paths even inside a writable
directory (its mandatory deny list: .git/hooks, .git/config, shell rc files, ...).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.attacks.conftest import inline_code
from tests.engine.test_run import TRUSTDB, run_confined, workdir_of

pytestmark = [pytest.mark.root, pytest.mark.bpf]


@pytest.fixture
def repo(run_env: dict[str, str]) -> Path:
    git = shutil.which("git")
    if git is None:
        pytest.fail("git is missing (packaging/apt-packages.txt installs it)")
    workdir = workdir_of(run_env)
    subprocess.run([git, "init", "-q", str(workdir)], check=True)
    return workdir


def test_git_config_planted_from_inside(interpreters_db: Path, run_env: dict[str, str],
                                        repo: Path) -> None:
    marker = repo / "ran-outside"
    script = (f"printf '[core]\\n\\tfsmonitor = \"touch {marker}; false\"\\n' >> .git/config; "
              "echo config=$?; printf '#!/bin/sh\\ntrue\\n' > .git/hooks/pre-commit; "
              "echo hook=$?")
    got = run_confined(interpreters_db, script, run_env)
    assert "config=" in got.out, (got.out, got.err)
    # What the user does next, outside any run:
    subprocess.run(["git", "-C", str(repo), "status", "--short"], capture_output=True,
                   check=False, timeout=30)
    assert not marker.exists(), "the user's git status ran a command planted by the tree"
    assert "config=0" not in got.out and "hook=0" not in got.out  # policy: [filesystem] protected


# A `commondir` file in $GIT_DIR moves git's common directory (config, hooks, objects, refs)
# wherever it points: the tree copies .git to a directory of its own with a config of its own
# and points .git/commondir at it; .git/config and .git/hooks stay untouched.
PLANT_COMMONDIR = '''
import shutil, sys
marker = sys.argv[1]
shutil.copytree(".git", "evilgit", ignore=shutil.ignore_patterns("config", "hooks"))
with open("evilgit/config", "w") as f:
    f.write(open(".git/config").read())
    f.write('[core]\\n\\tfsmonitor = "touch %s; false"\\n' % marker)
with open(".git/commondir", "w") as f:
    f.write("../evilgit\\n")
print("planted")
'''


def test_git_commondir_redirects_config(interpreters_db: Path, run_env: dict[str, str],
                                        repo: Path) -> None:
    subprocess.run(["git", "-C", str(repo), "-c", "user.name=t", "-c", "user.email=t@t",
                    "commit", "-q", "--allow-empty", "-m", "x"], check=True, timeout=30)
    marker = repo / "ran-outside"
    (repo / "plant.txt").write_text(PLANT_COMMONDIR)
    got = run_confined(interpreters_db, f"{sys.executable} {inline_code('plant.txt')} {marker}", run_env)
    assert "planted" in got.out, (got.out, got.err)
    subprocess.run(["git", "-C", str(repo), "status", "--short"], capture_output=True,
                   check=False, timeout=30)
    assert not marker.exists(), "the user's git status ran a command planted by the tree"


def test_nested_repo_reached_by_the_outer_git_status(interpreters_db: Path,
                                                     run_env: dict[str, str], repo: Path) -> None:
    """The tree makes `foo/` a repository of its own with core.fsmonitor set, and adds it to
    the outer index as a submodule entry (no .gitmodules needed). The bytes are prepared
    outside in `stage/` (what the tree would write with its own git); the tree puts them in."""
    git = ["git", "-c", "user.name=t", "-c", "user.email=t@t"]
    subprocess.run([*git, "-C", str(repo), "commit", "-q", "--allow-empty", "-m", "x"],
                   check=True, timeout=30)
    marker = repo / "ran-outside"
    stage = repo / "stage"
    subprocess.run([*git, "init", "-q", str(stage / "foo")], check=True, timeout=30)
    subprocess.run([*git, "-C", str(stage / "foo"), "commit", "-q", "--allow-empty", "-m", "y"],
                   check=True, timeout=30)
    subprocess.run([*git, "-C", str(stage / "foo"), "config", "core.fsmonitor",
                    f"touch {marker}; false"], check=True, timeout=30)
    sha = subprocess.run([*git, "-C", str(stage / "foo"), "rev-parse", "HEAD"], check=True,
                         capture_output=True, text=True, timeout=30).stdout.strip()
    index = {"GIT_INDEX_FILE": str(stage / "index"), "PATH": "/usr/bin:/bin"}
    subprocess.run([*git, "-C", str(repo), "read-tree", "HEAD"], env=index, check=True)
    subprocess.run([*git, "-C", str(repo), "update-index", "--add", "--cacheinfo",
                    f"160000,{sha},foo"], env=index, check=True, timeout=30)
    (repo / "plant.txt").write_text(
        "import os, shutil\nos.rename('stage/foo', 'foo')\n"
        "shutil.copyfile('stage/index', '.git/index')\nprint('planted')\n")
    got = run_confined(interpreters_db, f"{sys.executable} {inline_code('plant.txt')}", run_env)
    assert "planted" in got.out, (got.out, got.err)
    subprocess.run(["git", "-C", str(repo), "status", "--short"], capture_output=True,
                   check=False, timeout=30)
    assert not marker.exists(), "the user's git status ran the nested repository's command"
    assert "trustdb: set aside" in got.err and (repo / "foo" / ".git.trustdb-set-aside").exists()


def test_submodule_the_tree_did_not_touch_is_kept(interpreters_db: Path,
                                                  run_env: dict[str, str], repo: Path) -> None:
    """Control: a submodule entry that was there before the run, unchanged, stays as it was."""
    git = ["git", "-c", "user.name=t", "-c", "user.email=t@t"]
    subprocess.run([*git, "init", "-q", str(repo / "dep")], check=True, timeout=30)
    subprocess.run([*git, "-C", str(repo / "dep"), "commit", "-q", "--allow-empty", "-m", "y"],
                   check=True, timeout=30)
    sha = subprocess.run([*git, "-C", str(repo / "dep"), "rev-parse", "HEAD"], check=True,
                         capture_output=True, text=True, timeout=30).stdout.strip()
    subprocess.run([*git, "-C", str(repo), "update-index", "--add", "--cacheinfo",
                    f"160000,{sha},dep"], check=True, timeout=30)
    got = run_confined(interpreters_db, "echo ran", run_env)
    assert "ran" in got.out and "set aside" not in got.err, (got.out, got.err)
    assert (repo / "dep" / ".git").is_dir()


def test_absent_user_site_cannot_be_planted(interpreters_db: Path,
                                           run_env: dict[str, str]) -> None:
    """With the workdir at $HOME, a user site dir that does not exist yet is no way to plant a
    .pth for the next `trustdb` started without -I: it is made empty and bound read-only."""
    home = workdir_of(run_env)
    env = dict(run_env, HOME=str(home))
    user_site = subprocess.run([sys.executable, "-c",
                                "import site; print(site.getusersitepackages())"],
                               env=env, capture_output=True, text=True, check=True).stdout.strip()
    assert user_site.startswith(str(home)) and not os.path.exists(user_site)
    (home / "plant.txt").write_text("import os\n")
    plant = (f"/usr/bin/busybox mkdir -p {user_site} ; "
             f"cp plant.txt {user_site}/evil.pth ; echo done")
    got = subprocess.run([*TRUSTDB, "run", "--db", str(interpreters_db), "--", "sh", "-c", plant],
                         env=env, cwd=home, capture_output=True, text=True, timeout=120,
                         check=False)
    assert "done" in got.stdout, (got.stdout, got.stderr)
    assert not os.path.exists(os.path.join(user_site, "evil.pth")), got.stderr
