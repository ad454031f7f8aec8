"""Files that redirect git, removed the moment the tree creates them in a protected `.git`.

The agent policy keeps `.git/config` and `.git/hooks` read-only inside the workdir: git runs
what they say (core.fsmonitor, core.pager, aliases, hooks) on the user's next unconfined
`git status`. A *new* file can do the same from beside them: `.git/commondir` moves git's
common directory (config, hooks) to a copy the tree controls, `.git/config.worktree` adds
config. A file that does not exist yet cannot be mounted over, and the tree must keep creating
files in `.git` (index.lock, HEAD.lock, COMMIT_EDITMSG) for git to work inside; so the
supervisor watches each protected `.git` (inotify, outside the tree) and removes these names
as soon as they appear, created or renamed in, and says so. What stays: the moment between
the tree's create and the removal (one event round trip), in which a git started by the
user outside would read the planted file.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import select
import shutil
import struct
import threading
import time
from collections.abc import Callable, Sequence

from trustdb.confine.git_nested import set_aside_changed_nested_repos, submodule_entries

REDIRECTS = frozenset({"commondir", "config.worktree", "gitdir"})
"""Names in a git directory that point git elsewhere or add config."""

IN_CREATE = 0x100
IN_MOVED_TO = 0x80
IN_ONLYDIR = 0x01000000
IN_CLOEXEC = 0o2000000
IN_NONBLOCK = 0o4000
_EVENT = struct.Struct("iIII")

_libc = ctypes.CDLL(None, use_errno=True)


class GitGuard:
    """Watches `git_dirs` from a thread of its own; `report(line)` for each removal."""

    def __init__(self, git_dirs: Sequence[str], report: Callable[[str], None]) -> None:
        self._report = report
        self._fd = -1
        self._dirs: dict[int, str] = {}
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._users: set[str] = set()
        self._since = time.time_ns()
        dirs = [d for d in git_dirs if os.path.basename(d) == ".git" and os.path.isdir(d)]
        self._git_dirs = dirs
        self._submodules = {d: submodule_entries(d) for d in dirs}
        """Each repository's populated submodules at the start (trustdb.confine.git_nested)."""
        if not dirs:
            return
        self._fd = _libc.inotify_init1(IN_CLOEXEC | IN_NONBLOCK)
        if self._fd < 0:
            return
        for d in dirs:
            wd = _libc.inotify_add_watch(self._fd, os.fsencode(d), IN_CREATE | IN_MOVED_TO |
                                         IN_ONLYDIR)
            if wd >= 0:
                self._dirs[wd] = d
        self._users = {os.path.join(d, n) for d in dirs for n in REDIRECTS
                       if os.path.lexists(os.path.join(d, n))}
        """There before the run: the user's (kept, and read-only inside: `protected`)."""

    def start(self) -> None:
        """Watch from a thread (after the fork: `confine.spawn` wants no threads)."""
        if not self._dirs:
            return
        self._thread = threading.Thread(target=self._watch, name="git-guard", daemon=True)
        self._thread.start()

    def close(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(2)
        for d in self._dirs.values():  # a last sweep: nothing planted stays after the run
            for name in REDIRECTS:
                self._remove(d, name)
        for d in self._git_dirs:  # the tree is gone: submodules it changed (git_nested)
            with contextlib.suppress(Exception):
                set_aside_changed_nested_repos(d, self._since, self._submodules[d],
                                               self._report)
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1

    def _watch(self) -> None:
        poller = select.poll()
        poller.register(self._fd, select.POLLIN)
        while not self._stop.is_set():
            if not poller.poll(200):
                continue
            try:
                data = os.read(self._fd, 65536)
            except BlockingIOError:
                continue
            except OSError:
                return
            offset = 0
            while offset + _EVENT.size <= len(data):
                wd, _mask, _cookie, length = _EVENT.unpack_from(data, offset)
                raw = data[offset + _EVENT.size:offset + _EVENT.size + length]
                offset += _EVENT.size + length
                name = raw.split(b"\0", 1)[0].decode(errors="replace")
                if name in REDIRECTS and wd in self._dirs:
                    self._remove(self._dirs[wd], name)

    def _remove(self, git_dir: str, name: str) -> None:
        path = os.path.join(git_dir, name)
        if path in self._users or not os.path.lexists(path):
            return  # the user's own (a repository that really has one): protected read-only
        with contextlib.suppress(OSError):
            if os.path.isdir(path) and not os.path.islink(path):
                shutil.rmtree(path)
            else:
                os.unlink(path)
            self._report(f"trustdb: removed {path}, created by the confined tree: it would "
                         "point git at another config and hooks, which the user's next git "
                         "command outside would run")
