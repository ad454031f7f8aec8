"""The host's system trees: where trusted programs and their configuration live. `run` never
lets the tree write inside them (a writable grant there is refused), so the first-seen
handler may treat everything under them as unwritable by the tree.
"""

from __future__ import annotations

import os

SYSTEM_TREES = ("/usr", "/etc", "/bin", "/sbin", "/lib", "/lib64", "/lib32", "/libx32", "/opt",
                "/boot")
PREFIXES = tuple(t + "/" for t in SYSTEM_TREES)


def in_system_tree(path: str) -> bool:
    """`path` (absolute, resolved) is a system tree or lies inside one."""
    return path in SYSTEM_TREES or path.startswith(PREFIXES)


def holds_system_tree(path: str) -> bool:
    """`path` (absolute, resolved) is a system tree or contains one (`/`)."""
    top = path.rstrip("/") + "/"
    return any(t == path or t.startswith(top) for t in SYSTEM_TREES)


def writable_grant_error(paths: list[str]) -> str:
    """A one-line refusal for the first writable grant that is, holds or lies inside a system
    tree ('' if none): inside one, the handler's rules for system trees (no write watching, no
    judging of data there) and their read-only mounts would not hold."""
    for p in paths:
        real = os.path.realpath(p)
        if holds_system_tree(real):
            where = f"holds system trees ({', '.join(SYSTEM_TREES)})"
        elif in_system_tree(real):
            where = f"lies inside the system tree /{real.split('/')[1]}"
        else:
            continue
        return (f"{p} would be writable inside the run and {where}: start run in a project "
                "directory outside the system trees, or give --workdir DIR")
    return ""


__all__ = ["PREFIXES", "SYSTEM_TREES", "holds_system_tree", "in_system_tree",
           "writable_grant_error"]


def system_devices() -> frozenset[int]:
    """The devices (kernel encoding, as InodeKey.dev) the system trees live on now. A key of
    any other device is only as good as that device's identity, which a user can forge: a FUSE
    mount or an attached image on a reused device number serves other bytes at a cached inode
    and ctime (see Mirror.prime)."""
    out = set()
    for tree in SYSTEM_TREES:
        try:
            dev = os.stat(tree).st_dev
        except OSError:
            continue
        out.add((os.major(dev) << 20) | os.minor(dev))
    return frozenset(out)

