"""The system calls the confined tree is built with, through libc (ctypes): one home for the
constants and the one-line error they raise."""

from __future__ import annotations

import ctypes
import os

# --- <linux/sched.h>, <sys/mount.h>, <linux/mount.h>, <linux/prctl.h> ---
CLONE_NEWNS = 0x00020000
CLONE_NEWPID = 0x20000000
MS_RDONLY = 1
MS_NOSUID = 2
MS_NODEV = 4
MS_NOEXEC = 8
MS_REMOUNT = 32
MS_BIND = 4096
MS_REC = 16384
MS_PRIVATE = 1 << 18
PR_SET_PDEATHSIG = 1
PR_SET_NAME = 15
AT_FDCWD = -100
AT_RECURSIVE = 0x8000
AT_EMPTY_PATH = 0x1000
OPEN_TREE_CLONE = 1
MOVE_MOUNT_F_EMPTY_PATH = 0x4
MOUNT_ATTR_RDONLY = 0x1
SYS_OPEN_TREE = 428
SYS_MOVE_MOUNT = 429
SYS_MOUNT_SETATTR = 442



class ConfineError(Exception):
    """Setting up the confined tree failed (one line)."""


libc = ctypes.CDLL(None, use_errno=True)


def check(rc: int, what: str) -> int:
    if rc < 0:
        err = ctypes.get_errno()
        raise ConfineError(f"{what}: {os.strerror(err)}")
    return rc


def mount(source: str | None, target: str, fstype: str | None, flags: int,
           data: str | None = None) -> None:
    enc = (lambda s: None if s is None else s.encode())
    check(libc.mount(enc(source), target.encode(), enc(fstype), ctypes.c_ulong(flags),
                       enc(data)), f"mount {target}")



class MountAttr(ctypes.Structure):
    _fields_ = [("attr_set", ctypes.c_uint64), ("attr_clr", ctypes.c_uint64),
                ("propagation", ctypes.c_uint64), ("userns_fd", ctypes.c_uint64)]


def read_only_tree(path: str, *, read_only: bool = True, recursive: bool = True) -> None:
    """Make the mount at `path` (and, if `recursive`, every mount below it) read-only, or
    writable again (in this namespace only)."""
    attr = MountAttr(MOUNT_ATTR_RDONLY, 0, 0, 0) if read_only else MountAttr(0, MOUNT_ATTR_RDONLY, 0, 0)
    check(libc.syscall(SYS_MOUNT_SETATTR, AT_FDCWD, path.encode(), AT_RECURSIVE if recursive else 0,
                       ctypes.byref(attr), ctypes.sizeof(attr)),
          f"{'read-only' if read_only else 'writable'} {path}")


def clone_mount(path: str, recursive: bool = False) -> int:
    """A detached copy of the mount at `path` (open_tree), to re-attach after /dev is covered."""
    flags = OPEN_TREE_CLONE | os.O_CLOEXEC | (AT_RECURSIVE if recursive else 0)
    return check(libc.syscall(SYS_OPEN_TREE, AT_FDCWD, path.encode(), flags), f"clone {path}")


def attach_mount(fd: int, target: str) -> None:
    check(libc.syscall(SYS_MOVE_MOUNT, fd, b"", AT_FDCWD, target.encode(),
                         MOVE_MOUNT_F_EMPTY_PATH), f"attach {target}")
    os.close(fd)


def unshare(flags: int) -> None:
    check(libc.unshare(flags), "unshare")


def setns(fd: int, nstype: int) -> None:
    check(libc.setns(fd, nstype), "setns")


def set_name(name: str) -> None:
    libc.prctl(PR_SET_NAME, name.encode()[:15], 0, 0, 0)


