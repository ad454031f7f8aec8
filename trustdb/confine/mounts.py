"""The mount namespace the confined tree sees: covers over the trust DB and bpffs, a minimal
/dev, a read-only /proc and /sys, read-only binds of what must not change."""

from __future__ import annotations

import os
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from trustdb.confine.syscalls import (
    MS_BIND,
    MS_NODEV,
    MS_NOEXEC,
    MS_NOSUID,
    MS_PRIVATE,
    MS_RDONLY,
    MS_REC,
    MS_REMOUNT,
    attach_mount,
    clone_mount,
    mount,
    read_only_tree,
)

DEV_NODES = ("null", "zero", "full", "random", "urandom", "tty")
"""Character devices the confined tree keeps; everything else under /dev disappears."""

KERNEL_HELPER_CONFIG = (
    "/etc/modprobe.d",
    "/lib/modprobe.d",
    "/usr/lib/modprobe.d",
    "/etc/request-key.conf",
    "/etc/request-key.d",
)
"""Read by programs the *kernel* starts as root outside any cgroup (modprobe on a
request_module, request-key): an `install` line there would run untrusted code unconfined."""



@dataclass(frozen=True)
class MountPlan:
    """What the confined tree sees of the filesystem (built in the child's mount namespace)."""

    hidden: tuple[str, ...]
    """Covered by an empty read-only tmpfs (or /dev/null for a file): the trust DB directory,
    /sys/fs/bpf, and the policy's no-access paths that a grant would otherwise reach."""
    read_only: tuple[str, ...] = ()
    """Bind-mounted read-only: the decision log, trustdb's own code and interpreter,
    kernel-helper configs."""
    private: tuple[str, ...] = ()
    """A fresh empty writable tmpfs for the tree alone: /tmp and /var/tmp (the private tmp)."""
    keep: tuple[str, ...] = ()
    """Granted paths: where one lies below a cover or a private tmp, it is re-attached there
    (the workdir under /tmp, an --allow-read path under a hidden directory)."""
    read_write: tuple[str, ...] = ()
    """Only without Landlock: everything else is made read-only, these stay writable."""
    everything_read_only: bool = False
    """The mount-namespace fallback when Landlock is missing."""
    pinned: tuple[str, ...] = ()
    """Bind-mounted onto themselves, still writable: a mount point cannot be renamed or removed,
    so a directory holding protected files (`.git`) cannot be swapped for another one."""
    unlisted: tuple[str, ...] = ()
    """What the policy grants nothing of (`/var/lib`, `/srv`, other entries of a home beside
    the workdir): covered like `hidden`, so that no path there resolves at all. Landlock refuses
    opens, not path walks: connect(2) to a UNIX socket there, stat() and execve's name lookup
    would still see them."""
    resolv_conf: str = ""
    """A resolver configuration to show at /etc/resolv.conf (read-only): the host's servers
    with `options use-vc`, when the tree may not use UDP (DNS over TCP port 53)."""

    @classmethod
    def for_run(cls, db: Path, extra_read_only: Sequence[str] = (), **more: object) -> MountPlan:
        """The trust database, bpffs and trustdb's state directory (its remembered probes and
        CO-RE targets, trustdb.corecache) are covered whatever the policy grants."""
        from trustdb.state import STATE_DIR

        package = str(Path(__file__).resolve().parents[1])
        state = os.path.realpath(STATE_DIR)
        keep = more.pop("keep", ())
        more["keep"] = tuple(k for k in keep  # type: ignore[attr-defined]
                             if k != state and not k.startswith(state + "/"))
        return cls(
            hidden=(str(db.resolve()), "/sys/fs/bpf", state,
                    *more.pop("hidden", ())),  # type: ignore[misc]
            read_only=(package, "/etc/trustdb", *KERNEL_HELPER_CONFIG, *extra_read_only),
            **more,  # type: ignore[arg-type]
        )


def _minimal_dev() -> None:
    """Replace /dev with a tmpfs holding only DEV_NODES, a private /dev/pts and a private
    /dev/shm: no disk, /dev/mem or /dev/kmsg to go around the covers with, and no path to the
    user's terminal (its /dev/pts/N lives in the host's devpts instance, not in ours)."""
    kept = {name: clone_mount(f"/dev/{name}") for name in DEV_NODES if os.path.exists(f"/dev/{name}")}
    mount("tmpfs", "/dev", "tmpfs", MS_NOSUID | MS_NOEXEC, "mode=0755,size=64k")
    for name, fd in kept.items():
        os.close(os.open(f"/dev/{name}", os.O_CREAT | os.O_WRONLY, 0o666))
        attach_mount(fd, f"/dev/{name}")
    os.mkdir("/dev/pts")
    mount("devpts", "/dev/pts", "devpts", MS_NOSUID | MS_NOEXEC, "newinstance,ptmxmode=0666,mode=620")
    os.symlink("pts/ptmx", "/dev/ptmx")
    os.mkdir("/dev/shm", 0o1777)
    mount("tmpfs", "/dev/shm", "tmpfs", MS_NOSUID | MS_NODEV, "mode=1777")
    for name, target in (("fd", "/proc/self/fd"), ("stdin", "/proc/self/fd/0"),
                         ("stdout", "/proc/self/fd/1"), ("stderr", "/proc/self/fd/2")):
        os.symlink(target, f"/dev/{name}")
    mount(None, "/dev", None, MS_REMOUNT | MS_RDONLY | MS_NOSUID | MS_NOEXEC)


def _bind_read_only(path: str) -> None:
    mount(path, path, None, MS_BIND | MS_REC)
    read_only_tree(path)


def _unescape(field: str) -> str:
    return re.sub(r"\\([0-7]{3})", lambda m: chr(int(m.group(1), 8)), field)


def _under(path: str, top: str) -> bool:
    return top == "/" or path == top or path.startswith(top.rstrip("/") + "/")


def mount_aliases(path: str) -> list[str]:
    """Other paths that reach the directory `path`: its filesystem mounted, or bind-mounted,
    somewhere else too (a cover on one path would leave the other open)."""
    try:
        st = os.stat(path)
    except OSError:
        return []
    dev = f"{os.major(st.st_dev)}:{os.minor(st.st_dev)}"
    mounts = []
    with open("/proc/self/mountinfo") as f:
        for line in f:
            fields = line.split()
            if fields[2] == dev:
                mounts.append((_unescape(fields[3]), _unescape(fields[4])))
    holders = [m for m in mounts if _under(path, m[1])]
    if not holders:
        return []
    own = max(holders, key=lambda m: len(m[1]))
    in_fs = os.path.normpath(os.path.join(own[0], os.path.relpath(path, own[1])))
    aliases = []
    for root, mountpoint in mounts:
        if (root, mountpoint) != own and _under(in_fs, root):
            alias = os.path.normpath(os.path.join(mountpoint, os.path.relpath(in_fs, root)))
            if alias != path and os.path.isdir(alias):
                aliases.append(alias)
    return sorted(set(aliases))


def _strictly_under(path: str, top: str) -> bool:
    return path != top and _under(path, top)


def _cover(path: str, fstype_data: str, flags: int, inner: list[tuple[str, int, bool]]) -> None:
    """Mount an empty tmpfs (a directory) or /dev/null (a file) over `path`, then re-attach the
    kept mounts `inner` (path, detached clone, is_dir) below it, then apply `flags`."""
    if not os.path.lexists(path):
        return  # under an earlier cover (a DB below the private /tmp): already out of sight
    if os.path.islink(path):
        return  # /var/run -> /run: its target is covered under its own name
    if not os.path.isdir(path):
        mount("/dev/null", path, None, MS_BIND)
        return
    noexec = MS_NOEXEC if flags & MS_RDONLY else 0  # empty and read-only: nothing to run
    mount("tmpfs", path, "tmpfs", MS_NOSUID | MS_NODEV | noexec, fstype_data)
    for target, fd, is_dir in inner:
        if is_dir:
            os.makedirs(target, exist_ok=True)
        else:
            os.makedirs(os.path.dirname(target), exist_ok=True)
            os.close(os.open(target, os.O_CREAT | os.O_WRONLY, 0o600))
        attach_mount(fd, target)
    if flags & MS_RDONLY:
        read_only_tree(path, recursive=False)


def apply_mount_plan(plan: MountPlan) -> None:
    """Build the confined view. Runs in the child, after unshare(CLONE_NEWNS), as the init of the
    new PID namespace (so the new /proc shows only the confined tree)."""
    hidden = [a for p in plan.hidden for a in (p, *mount_aliases(p))]
    mount(None, "/", None, MS_REC | MS_PRIVATE)  # nothing below propagates back to the host
    resolver = clone_mount(plan.resolv_conf) if plan.resolv_conf else -1
    _minimal_dev()
    # Read-only: no write open of /proc/PID/mem (a forced write over read-only text, which no
    # exec or mmap hook sees), of /proc/PID/attr, or of any other proc file (issue 8, route 5).
    mount("proc", "/proc", "proc", MS_RDONLY | MS_NOSUID | MS_NODEV | MS_NOEXEC)
    # core_pattern, modprobe, binfmt_misc and sysrq would each run code outside the tree.
    for p in ("/proc/sys", "/proc/sysrq-trigger"):
        if os.path.exists(p):
            _bind_read_only(p)
    # cgroup files (moves, freeze, kill), uevent_helper, tracefs, securityfs: read-only.
    read_only_tree("/sys")
    covers = [(p, True) for p in plan.private if os.path.isdir(p)]
    covers += [(p, False) for p in (*hidden, *plan.unlisted)
               if os.path.lexists(p) and p not in plan.keep]
    # Outermost first, so that a cover inside another one is mounted on top of it.
    covers.sort(key=lambda c: c[0].count("/"))
    # Clone every kept path below a cover before the cover hides it.
    inner: dict[str, list[tuple[str, int, bool]]] = {c: [] for c, _ in covers}
    for keep in plan.keep:
        holder = max((c for c, _ in covers if _strictly_under(keep, c)), key=len, default=None)
        # A keep inside another keep below the same cover comes along with that one's clone.
        if any(_strictly_under(keep, k) and _strictly_under(k, holder) for k in plan.keep
               if holder is not None):
            continue
        if holder is not None and os.path.exists(keep):
            inner[holder].append((keep, clone_mount(keep, recursive=True), os.path.isdir(keep)))
    for path, private in covers:
        if private:
            _cover(path, "mode=1777", 0, inner[path])
        else:
            _cover(path, "mode=0555,size=4k", MS_RDONLY, inner[path])
    if plan.everything_read_only:
        # No Landlock: what is not granted becomes read-only (not invisible), and the grants
        # are made writable again one by one (binds of themselves; mounts below keep theirs).
        read_only_tree("/")
        for p in (*plan.read_write, *(c for c, private in covers if private), "/dev/shm",
                  "/dev/pts"):
            if os.path.isdir(p):
                if not os.path.ismount(p):
                    mount(p, p, None, MS_BIND | MS_REC)
                read_only_tree(p, read_only=False, recursive=False)
    for p in plan.pinned:
        if os.path.isdir(p):
            mount(p, p, None, MS_BIND | MS_REC)
    for p in plan.read_only:
        if os.path.exists(p):
            _bind_read_only(p)
    if resolver >= 0:
        target = os.path.realpath("/etc/resolv.conf")
        if os.path.isfile(target):
            attach_mount(resolver, target)
            read_only_tree(target, recursive=False)
        else:
            os.close(resolver)
