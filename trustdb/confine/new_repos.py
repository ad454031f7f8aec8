"""Git repositories the confined tree creates itself (`git init`, a planted `.git` file, a bare
repository, a nested repository registered in the outer index), disarmed when the run ends.

The git guard (trustdb.confine.git_guard) and the `protected` names keep the user's existing
repositories' config and hooks read-only. A repository the tree makes has the tree's config
(core.fsmonitor, core.pager, aliases) and hooks, which the user's next `git status` there
would run, unconfined, including from the outer repository (`git status` enters a submodule
entry with GIT_DIR set, which skips git's ownership check). So, for each new one: its config,
config.worktree, commondir and hooks are moved aside (`NAME.trustdb-untrusted`; a minimal
config takes config's place), and its `.git` is given to uid nobody (not recursively) so that
git's own discovery refuses it too ("dubious ownership", safe.directory). A line says what was
moved and how to take it back after reading it.

New means: not there, by path and inode, when the run started (a walk of the read-write
grants, before the tree starts). What stays: the user's git, run outside while the tree is
still running, sees the new repository with its creator's ownership; and a user whose git
has `safe.directory = *` has switched the check off.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import stat
from collections.abc import Callable, Iterable, Sequence

NOBODY = 65534
SUFFIX = ".trustdb-untrusted"
DISARMED = ("config", "config.worktree", "commondir", "hooks")
"""What makes git run or read something else: moved aside in a new repository."""


def git_entries(tops: Iterable[str]) -> dict[str, tuple[int, int]]:
    """Every `.git` (directory or file) and bare repository under `tops`: path -> (dev, ino).
    Does not descend into them, nor follow symlinks."""
    found: dict[str, tuple[int, int]] = {}
    for top in tops:
        for dirpath, dirnames, filenames in os.walk(top, onerror=lambda _e: None):
            if "HEAD" in filenames and "objects" in dirnames and "refs" in dirnames:
                _add(found, dirpath)  # a bare repository (or a git directory itself)
                dirnames.clear()
                continue
            if ".git" in dirnames or ".git" in filenames:
                _add(found, os.path.join(dirpath, ".git"))
                with contextlib.suppress(ValueError):
                    dirnames.remove(".git")
    return found


def _add(found: dict[str, tuple[int, int]], path: str) -> None:
    with contextlib.suppress(OSError):
        st = os.lstat(path)
        found[path] = (st.st_dev, st.st_ino)


class NewRepoGuard:
    """Snapshot at construction (before the tree starts), hand over new ones at `close`."""

    def __init__(self, grants: Sequence[str], report: Callable[[str], None]) -> None:
        self._grants = tuple(g for g in grants if os.path.isdir(g))
        self._report = report
        self._before = git_entries(self._grants)

    def close(self) -> list[str]:
        """Disarm every repository the tree created; the paths of their git directories."""
        handed = []
        for path, ident in git_entries(self._grants).items():
            if self._before.get(path) == ident:
                continue
            try:
                st = os.lstat(path)
                git_dir = _git_dir_of(path, st)
                moved = _disarm(git_dir) if git_dir else []
                if st.st_uid != NOBODY:
                    os.lchown(path, NOBODY, NOBODY)
            except OSError:
                continue
            handed.append(path)
            self._report(
                f"trustdb: {path} is a git repository the confined tree created: its "
                f"{', '.join(moved) or 'git directory'} would run outside (also from the outer "
                f"repository's git status), so they were moved aside ({SUFFIX}) and it belongs "
                f"to nobody, which git refuses. Read them, then: chown {st.st_uid}:{st.st_gid} "
                f"'{path}' and move them back")
        return handed


def _git_dir_of(path: str, st: os.stat_result) -> str:
    """The git directory of a new `.git` entry or bare repository ('' for a `.git` file: what
    it points at is the tree's own directory, found by the walk when inside the grants)."""
    return path if stat.S_ISDIR(st.st_mode) else ""


def _disarm(git_dir: str) -> list[str]:
    moved = []
    for name in DISARMED:
        src = os.path.join(git_dir, name)
        if not os.path.lexists(src):
            continue
        dst = src + SUFFIX
        with contextlib.suppress(FileNotFoundError):
            if os.path.isdir(dst) and not os.path.islink(dst):
                shutil.rmtree(dst)
            elif os.path.lexists(dst):
                os.unlink(dst)
        os.rename(src, dst)
        moved.append(name)
    bare = os.path.basename(git_dir) != ".git"
    fd = os.open(os.path.join(git_dir, "config"), os.O_WRONLY | os.O_CREAT | os.O_EXCL
                 | os.O_NOFOLLOW, 0o644)
    with os.fdopen(fd, "w") as f:
        f.write(f"[core]\n\trepositoryformatversion = 0\n\tbare = {str(bare).lower()}\n")
    return moved
