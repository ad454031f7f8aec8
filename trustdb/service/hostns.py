"""Writers the service may trust live in the host's own namespaces.

A `trustdb run` tree is root in namespaces of its own, and its /usr is a read-only bind of the
host's: it can exec the host's trusted rpm, dpkg or ld, whose exec events the daemon's inode
marks see, and write where its close-writes reach the daemon's filesystem marks. Trusted there,
the tree's `cc -o evil` (with `[compilers] trust_outputs`) or `rpm -i` of a package of its own
would be trusted in the system database that `run` itself follows: a way out of the run. So
(both checks, because either alone has a gap):
- the file of every event (the binary exec'd, the file closed) must be open through a mount of
  the daemon's own mount namespace: a process in another one reaches files only through copies
  of the mounts, with other mount ids, and this holds after the process is gone;
- a writer still alive must share the daemon's mount and pid namespaces (a tree could write
  through an fd it inherited from outside, e.g. a log file given as its stderr).
A container's package manager is refused for the same reason: its root is not the host's.
"""

from __future__ import annotations

import os

_KINDS = ("mnt", "pid")


def _namespaces(pid: int | str) -> tuple[int, ...]:
    return tuple(os.stat(f"/proc/{pid}/ns/{kind}").st_ino for kind in _KINDS)


def in_host_namespaces(pid: int) -> bool | None:
    """True when `pid` shares our mount and pid namespaces, False when it does not (or cannot
    be read), None when it is gone (the caller decides from what it saw at its exec)."""
    try:
        return _namespaces(pid) == _namespaces("self")
    except FileNotFoundError:
        return None
    except OSError:
        return False


class HostMounts:
    """The mount ids of the daemon's mount namespace, re-read when an unknown one is met (a
    mount made since)."""

    def __init__(self) -> None:
        self._ids = self._read()

    @staticmethod
    def _read() -> frozenset[int]:
        try:
            with open("/proc/self/mountinfo") as f:
                return frozenset(int(line.split(" ", 1)[0]) for line in f if line.strip())
        except (OSError, ValueError):
            return frozenset()

    def holds(self, fd: int) -> bool:
        """`fd` (an event's file) is open through one of our own mounts."""
        try:
            with open(f"/proc/self/fdinfo/{fd}") as f:
                mnt_id = next(int(line.split()[1]) for line in f if line.startswith("mnt_id:"))
        except (OSError, ValueError, StopIteration, IndexError):
            return False
        if mnt_id not in self._ids:
            self._ids = self._read()
        return mnt_id in self._ids


HOST_MOUNTS = HostMounts()
"""One per process (the daemon's): built at import, in the host's namespaces."""


def host_writer_file(fd: int, pid: int) -> bool:
    """A close-write or exec event of `pid` on `fd` may carry a trusted writer's trust."""
    return HOST_MOUNTS.holds(fd) and in_host_namespaces(pid) is not False
