"""Process attributes the confined command starts with, set in the child right before exec:
no CAP_SYS_TIME, memory-deny-write-execute (unless the policy names a JIT), its own session.

Each is inherited across fork and exec and none can be undone from inside: the bounding set only
shrinks, and PR_SET_MDWE cannot be cleared once set.
"""

from __future__ import annotations

import ctypes
import os

from trustdb.confine.syscalls import ConfineError, libc

# <linux/prctl.h>, <linux/capability.h>
PR_CAPBSET_DROP = 24
PR_SET_MDWE = 65
PR_GET_MDWE = 66
PR_MDWE_REFUSE_EXEC_GAIN = 1
CAP_SYS_TIME = 25
_LINUX_CAPABILITY_VERSION_3 = 0x20080522
_SYS_CAPGET = 125
_SYS_CAPSET = 126

CAP_NET_RAW = 13
CAP_SYSLOG = 34

DROPPED_CAPABILITIES = {
    CAP_SYS_TIME: "CAP_SYS_TIME: set the clock back and forge a trusted file's ctime",
    CAP_NET_RAW: "CAP_NET_RAW: packet and raw sockets, past Landlock's TCP port rules",
    CAP_SYSLOG: "CAP_SYSLOG: the host's kernel log (syslog(2) is denied in seccomp as well)",
}


class _CapHeader(ctypes.Structure):
    _fields_ = [("version", ctypes.c_uint32), ("pid", ctypes.c_int)]


class _CapData(ctypes.Structure):
    _fields_ = [("effective", ctypes.c_uint32), ("permitted", ctypes.c_uint32),
                ("inheritable", ctypes.c_uint32)]


def _fail(what: str) -> None:
    raise ConfineError(f"{what}: {os.strerror(ctypes.get_errno())}")


def drop_capabilities(caps: dict[int, str] = DROPPED_CAPABILITIES) -> None:
    """Remove `caps` from the bounding set (so no exec, not even of a setuid or file-capability
    binary, gets them back) and from this process's effective, permitted, inheritable sets."""
    header = _CapHeader(_LINUX_CAPABILITY_VERSION_3, 0)
    data = (_CapData * 2)()
    if libc.syscall(_SYS_CAPGET, ctypes.byref(header), data) != 0:
        _fail("capget")
    for cap in caps:
        if libc.prctl(PR_CAPBSET_DROP, cap, 0, 0, 0) != 0:
            _fail(f"drop capability {cap}")
        word, bit = divmod(cap, 32)
        mask = ~(1 << bit) & 0xFFFFFFFF
        data[word].effective &= mask
        data[word].permitted &= mask
        data[word].inheritable &= mask
    if libc.syscall(_SYS_CAPSET, ctypes.byref(header), data) != 0:
        _fail("capset")


def mdwe_supported() -> bool:
    """PR_SET_MDWE exists (Linux 6.3+)."""
    return libc.prctl(PR_GET_MDWE, 0, 0, 0, 0) >= 0


def deny_write_execute() -> None:
    """No anonymous W+X mapping and no making written memory executable, for this process and
    everything it starts (the kernel's W^X, which breaks JITs: only when the policy names none)."""
    if libc.prctl(PR_SET_MDWE, PR_MDWE_REFUSE_EXEC_GAIN, 0, 0, 0) != 0:
        _fail("prctl(PR_SET_MDWE)")


def new_session(terminal: int = -1, replaced: tuple[int, ...] = ()) -> None:
    """A session of its own: no controlling terminal, or, when given one, the pty the supervisor
    relays, in place of the std fds in `replaced` (the user's terminal is never reachable
    through /dev/tty or an inherited fd)."""
    os.setsid()
    if terminal >= 0:
        import fcntl
        import termios

        fcntl.ioctl(terminal, termios.TIOCSCTTY, 0)
        for fd in replaced:
            os.dup2(terminal, fd)
        os.close(terminal)
