"""Git repositories the confined tree creates itself (`git init`, a planted `.git` file, a bare
repository), handed to nobody when the run ends so that the user's git outside refuses them.

The git guard (trustdb.confine.git_guard) and the `protected` names keep the user's existing
repositories' config and hooks read-only. A repository the tree makes has the tree's config
(core.fsmonitor, core.pager, aliases) and hooks, which the user's next `git status` there
would run, unconfined. Git (2.35.2+) refuses any repository whose git directory, `.git` file
or work tree is owned by another user ("dubious ownership", safe.directory), before it reads
its config: so each new one is given to uid nobody (not recursively: the tree's files keep
their owner), and a line says how to take it back after reading its config and hooks.

New means: not there, by path and inode, when the run started (a walk of the read-write
grants, before the tree starts). What stays: the user's git, run outside while the tree is
still running, sees the new repository with its creator's ownership; and a user whose git
has `safe.directory = *` has switched the check off.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable, Iterable, Sequence

NOBODY = 65534


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
        """Give every repository the tree created to nobody; the paths handed over."""
        handed = []
        for path, ident in git_entries(self._grants).items():
            if self._before.get(path) == ident:
                continue
            try:
                st = os.lstat(path)
                if st.st_uid == NOBODY:
                    continue
                os.lchown(path, NOBODY, NOBODY)
            except OSError:
                continue
            handed.append(path)
            self._report(
                f"trustdb: {path} is a git repository the confined tree created: it now "
                f"belongs to nobody, so git refuses it (its config and hooks are the tree's "
                f"and would run outside). Read them, then: chown {st.st_uid}:{st.st_gid} "
                f"'{path}'")
        return handed
