"""What the first-seen handler process does to itself right after the fork
(trustdb.first_seen_serve): drop what it inherited, run real-time, and open its own LMDB
environment."""

from __future__ import annotations

import contextlib
import os

REALTIME_PRIORITY = 10


def close_inherited(keep: set[int]) -> None:
    """Close what the supervisor held (pipes of the confined child, BPF links and programs),
    keeping BPF maps and `keep`: a handler must not keep the tree's gate or links alive."""
    for name in os.listdir("/proc/self/fd"):
        fd = int(name)
        if fd <= 2 or fd in keep:
            continue
        try:
            if os.readlink(f"/proc/self/fd/{fd}") == "anon_inode:bpf-map":
                continue
            os.close(fd)
        except OSError:
            continue


def realtime() -> None:
    """Run as a real-time task: a chmod, link or rename of a watched file is followed by an exec
    within a fork's time, and the ignore marks must be gone before that exec opens the file.
    The handler only ever sleeps in poll between events, and the kernel's RT throttling caps a
    runaway anyway."""
    with contextlib.suppress(OSError, AttributeError):
        os.sched_setscheduler(0, os.SCHED_FIFO, os.sched_param(REALTIME_PRIORITY))


def forget_parent_lmdb_envs() -> None:
    """py-lmdb refuses a second open of an environment "in this process" by remembering the
    open ones in memory, which fork copies. LMDB's own rule is the opposite: a forked child
    must not use the parent's environment (its fcntl locks stayed with the parent) and must
    open its own. Key the guard by our pid so that this process's one open goes through."""
    try:
        import lmdb._envid as envid
    except ImportError:  # an older py-lmdb: no such guard
        return
    pid = os.getpid()
    envid.env_keys = lambda path, subdir: (("first-seen handler", pid, os.fsdecode(path)),)
