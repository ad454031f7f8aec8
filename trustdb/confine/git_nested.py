"""Nested repositories the tree changed, set aside at the end of a run (`git-nested-repos`).

`git status` of a repository enters every populated submodule (a gitlink entry in its index
whose directory has a `.git`) and runs git there with *that* repository's config, so its
core.fsmonitor runs. The outer index must stay writable inside the tree (agents commit), so
the tree can make a repository of its own in the workdir, or edit an existing submodule's
config under `.git/modules`, and register it: the user's next `git status` outside runs the
tree's command. After the run, when the tree is gone, the supervisor reads each protected
repository's index itself (no git is run on what the tree left), and for each gitlink whose
git directory, config, hooks or redirects changed during the run, renames the entry's `.git`
to `.git.trustdb-set-aside` and says so: git then sees an unpopulated submodule. The user
checks it and renames it back. A symlinked entry path is reported and left alone (nothing
outside the repository is ever touched).
"""

from __future__ import annotations

import contextlib
import os
import struct
from collections.abc import Callable, Iterator
from pathlib import Path

GITLINK = 0o160000
SET_ASIDE = ".git.trustdb-set-aside"
CLOCK_SLACK_NS = 20_000_000
"""ctime comes from a coarse clock (one tick, ~4 ms, behind): a change made right after the
start may carry a ctime a little before it."""
_HEADER = struct.Struct("!4sII")
_STAT = struct.Struct("!10I")


def gitlinks(index: bytes, hash_size: int = 20) -> Iterator[str]:
    """The paths of the gitlink entries of a git index (versions 2, 3 and 4)."""
    signature, version, count = _HEADER.unpack_from(index, 0)
    if signature != b"DIRC" or version not in (2, 3, 4):
        return
    at, previous = _HEADER.size, b""
    for _ in range(count):
        start = at
        mode = _STAT.unpack_from(index, at)[6]
        at += _STAT.size + hash_size
        (flags,) = struct.unpack_from("!H", index, at)
        at += 2 + (2 if version >= 3 and flags & 0x4000 else 0)
        if version == 4:
            strip, at = _varint(index, at)
            end = index.index(b"\0", at)
            name = previous[:len(previous) - strip] + index[at:end]
            at = end + 1
        else:
            end = index.index(b"\0", at)
            name = index[at:end]
            at = start + ((end - start + 8) & ~7)
        previous = name
        if mode & 0o170000 == GITLINK:
            yield name.decode(errors="surrogateescape")


def _varint(data: bytes, at: int) -> tuple[int, int]:
    c = data[at]
    value = c & 127
    while c & 128:
        at += 1
        c = data[at]
        value = ((value + 1) << 7) + (c & 127)
    return value, at + 1


def _nested_git_dir(dot_git: Path) -> Path | None:
    if dot_git.is_dir():
        return dot_git
    with contextlib.suppress(OSError, UnicodeDecodeError):
        text = dot_git.read_text().strip()
        if text.startswith("gitdir:"):
            return (dot_git.parent / text[len("gitdir:"):].strip()).resolve()
    return None


def _changed_since(dot_git: Path, since_ns: int) -> bool:
    """Whether the entry's `.git`, or what in its git directory makes git run commands, changed
    at or after `since_ns` (ctime: no clock in the tree can set it back)."""
    git_dir = _nested_git_dir(dot_git)
    watched = [] if git_dir == dot_git else [dot_git]  # a directory's ctime moves with each use
    if git_dir is not None:
        watched += [git_dir / "config", git_dir / "config.worktree",
                    git_dir / "commondir", git_dir / "hooks"]
        with contextlib.suppress(OSError):
            watched += list((git_dir / "hooks").iterdir())
        with contextlib.suppress(OSError):
            common = (git_dir / (git_dir / "commondir").read_text().strip()).resolve()
            watched += [common / "config", common / "hooks"]
    for path in watched:
        with contextlib.suppress(OSError):
            if os.lstat(path).st_ctime_ns >= since_ns - CLOCK_SLACK_NS:
                return True
    return False


Entries = dict[str, tuple[int, int]]
"""Submodule entry path (from the top repository) -> (st_dev, st_ino) of its `.git`."""
MAX_DEPTH = 8


def _populated(root: Path, git_dir: Path, prefix: str = "", depth: int = 0
               ) -> Iterator[tuple[str, Path]]:
    """(path from the top, `.git`) of each populated submodule entry of the repository whose
    worktree is `root`, and of theirs (git status recurses into submodules' submodules)."""
    try:
        paths = list(gitlinks((git_dir / "index").read_bytes()))
    except (OSError, ValueError, IndexError, struct.error):
        return
    for rel in paths:
        if ".." in Path(rel).parts or Path(rel).is_absolute():
            continue
        dot_git = root / rel / ".git"
        if not os.path.lexists(dot_git):
            continue  # not populated: git does not enter it
        yield prefix + rel, dot_git
        nested = _nested_git_dir(dot_git)
        entry = dot_git.parent
        if nested is not None and depth < MAX_DEPTH and _no_symlinks(entry):
            yield from _populated(entry, nested, f"{prefix}{rel}/", depth + 1)


def _no_symlinks(entry: Path) -> bool:
    return os.path.realpath(entry) == os.path.normpath(entry)


def submodule_entries(git_dir: str) -> Entries:
    """The populated submodule entries of a repository now (taken at the start of a run)."""
    out = {}
    for rel, dot_git in _populated(Path(git_dir).parent, Path(git_dir)):
        with contextlib.suppress(OSError):
            st = os.lstat(dot_git)
            out[rel] = (st.st_dev, st.st_ino)
    return out


def set_aside_changed_nested_repos(git_dir: str, since_ns: int, before: Entries,
                                   report: Callable[[str], None]) -> list[Path]:
    """For the repository whose git directory is `git_dir` (`WORK/.git`): set aside each
    submodule entry that is new since the start (`before`: its `.git` then) or changed since
    `since_ns` (module doc). Returns the renamed paths."""
    moved = []
    for rel, dot_git in list(_populated(Path(git_dir).parent, Path(git_dir))):
        if not _no_symlinks(dot_git.parent):
            report(f"trustdb: {dot_git.parent} is a submodule entry through a symlink, left "
                   "alone; check it before running git there")
            continue
        try:
            st = os.lstat(dot_git)
        except OSError:
            continue
        if before.get(rel) == (st.st_dev, st.st_ino) and not _changed_since(dot_git, since_ns):
            continue
        target = dot_git.parent / SET_ASIDE
        with contextlib.suppress(OSError):
            os.rename(dot_git, target)
            moved.append(target)
            report(f"trustdb: set aside {dot_git} as {target.name}: a repository the confined "
                   "tree changed, which the next `git status` of the outer repository would "
                   "enter with its own config and hooks; check it, then rename it back")
    return moved


__all__ = ["gitlinks", "set_aside_changed_nested_repos", "submodule_entries"]
