"""What the first-seen handler marks, and which files' opens it may stop seeing.

- `tree_mounts`: the mounts of a confined child's own mount namespace (`trustdb run`);
  `host_filesystems`: every exec-capable filesystem (the service).
- `watch_writes` / `settled_data`: whether an inode's ignore mark may cover its opens (a file
  the tree can write must keep being seen, so that a write open of trusted content is refused
  and data it wrote is judged again when an interpreter loads it as a script).
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterator

from trustdb.fanotify import FanotifyError
from trustdb.first_seen import Checked, Outcome, is_script_for
from trustdb.system_trees import PREFIXES as SYSTEM_TREE_PREFIXES


class HandlerError(FanotifyError):
    """The first-seen handler could not start (one line)."""


SKIP_FSTYPES = frozenset(
    {"proc", "sysfs", "cgroup", "cgroup2", "devpts", "tracefs", "debugfs", "securityfs", "bpf",
     "mqueue", "pstore", "configfs", "fusectl", "hugetlbfs", "autofs", "binfmt_misc",
     "efivarfs", "rpc_pipefs", "nsfs", "devtmpfs"}
)
"""Filesystems nobody executes from (or that cannot be marked)."""


_OCTAL_ESCAPE = re.compile(rb"\\([0-7]{3})")


def unescape_mount_point(field: bytes) -> str:
    """A mountinfo path field: the kernel writes space, tab, newline and backslash as \\ooo
    octal escapes and every other byte as it is (UTF-8 names stay bytes: /media/u/Müll)."""
    return os.fsdecode(_OCTAL_ESCAPE.sub(lambda m: bytes([int(m.group(1), 8)]), field))


def _mountinfo(path: str) -> Iterator[tuple[str, str, list[str]]]:
    with open(path, "rb") as f:
        for line in f:
            fields = line.split()
            sep = fields.index(b"-")
            yield (unescape_mount_point(fields[4]), os.fsdecode(fields[sep + 1]),
                   os.fsdecode(fields[5]).split(","))


def tree_mounts(pid: int) -> list[str]:
    """Paths (through /proc/<pid>/root) of the mounts in `pid`'s mount namespace that code can
    be executed from. Refuses a task that shares our mount namespace: marking those mounts
    would make the whole machine pay."""
    if os.stat(f"/proc/{pid}/ns/mnt").st_ino == os.stat("/proc/self/ns/mnt").st_ino:
        raise HandlerError(f"pid {pid} shares this process's mount namespace: not marking "
                           "the host's mounts")
    out: list[str] = []
    for mnt, fstype, _ in _mountinfo(f"/proc/{pid}/mountinfo"):
        if fstype in SKIP_FSTYPES:
            continue
        out.append(f"/proc/{pid}/root{mnt}")  # noexec too: `python3 /tmp/evil.py` (see mask_for)
    return out


def mask_for(target: str, perm_mask: int, open_mask: int, *, interpreters: bool) -> int:
    """The permission events to mark `target` with: a noexec mount runs no exec and maps no
    code, but an interpreter may still load a script from it (`python3 /dev/shm/evil.py`), so
    it gets open events while interpreters are judged, and none otherwise (0)."""
    try:
        noexec = bool(os.statvfs(target).f_flag & os.ST_NOEXEC)
    except OSError:
        return perm_mask
    if not noexec:
        return perm_mask
    return open_mask if interpreters else 0


def host_filesystems(mountinfo: str = "/proc/self/mountinfo") -> list[str]:
    """One mount point per exec-capable filesystem (the service marks whole filesystems)."""
    seen: set[int] = set()
    out: list[str] = []
    for mnt, fstype, opts in _mountinfo(mountinfo):
        if fstype in SKIP_FSTYPES or "noexec" in opts:
            continue
        try:
            dev = os.stat(mnt).st_dev
        except OSError:
            continue
        if dev not in seen:
            seen.add(dev)
            out.append(mnt)
    return out


# Trusted files in the system trees (trustdb.system_trees) keep full ignore marks even on a
# writable mount: every exec opens them, so watching their opens for writes would put round
# trips on every exec. Refusing writes there is the mount plan's job (read-only system trees
# inside `run`, and `run` refuses a writable grant inside one).


def watch_writes(fd: int) -> bool:
    """Keep seeing opens of this trusted file (to refuse write opens): its mount in the tree is
    writable and it lies outside the system trees (the workdir, tmp, /dev/shm, a home)."""
    if os.fstatvfs(fd).f_flag & os.ST_RDONLY:
        return False
    return not event_path(fd).startswith(SYSTEM_TREE_PREFIXES)


def may_vouch(fd: int, *, writes_refused: bool) -> bool:
    """May the handler's ignore mark vouch for this inode's content after its ctime moves
    (VOUCHED_BIT)? Only where no writer in scope can change the bytes unseen: the kernel drops
    the mark on FS_MODIFY, but a store through a shared-writable mapping raises none, so a
    vouched file that anyone may map writable could run new code under an old mark.
    - `run` (`writes_refused`): a read-only mount of the tree's namespace (the tree can make
      no mount: seccomp), or a watched file, whose write opens are all refused;
    - the service: root-owned and writable by nobody else (root may stop the service anyway).
      A read-only mount proves nothing there: any user can make a read-only bind view of their
      own file in a user namespace while it stays writable through its own path."""
    try:
        if writes_refused:
            return bool(os.fstatvfs(fd).f_flag & os.ST_RDONLY) or watch_writes(fd)
        st = os.fstat(fd)
    except OSError:
        return False
    return st.st_uid == 0 and not st.st_mode & 0o022


def settled_data(fd: int, checked: Checked) -> bool:
    """Data that no confined task can have written and that looks like no script (no script
    suffix, no `#!`): on a read-only mount or in the system trees, which the tree cannot write
    (the same rule as `_watch_writes`): /etc/ld.so.cache, locales, zoneinfo. Its opens may be
    ignored even while interpreters are judged; without that every exec paid a handler round
    trip for ld.so.cache (exec under `run` x1.35)."""
    if checked.outcome != Outcome.NOT_EXECUTABLE:
        return False
    try:
        if watch_writes(fd):
            return False
        head = os.pread(fd, 2, 0)
    except OSError:
        return False
    return not is_script_for(event_path(fd), head, (-1, -1), ())


def event_path(fd: int) -> str:
    """The file's path as the tree sees it (the kernel prints it from the tree's root)."""
    try:
        return os.readlink(f"/proc/self/fd/{fd}")
    except OSError:
        return f"fd {fd}"


__all__ = ["SKIP_FSTYPES", "HandlerError", "event_path", "host_filesystems",
           "mask_for", "settled_data", "tree_mounts", "unescape_mount_point",
           "watch_writes"]
