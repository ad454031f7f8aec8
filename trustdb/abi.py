"""ctypes mirror of bpf/trustdb.h: the structs that cross the kernel boundary.

Keep field order, widths and padding identical to the header; tests/engine/test_abi.py checks
every size and offset against the BTF of the built BPF objects.
"""

from __future__ import annotations

import ctypes
import enum

from trustdb.model import InodeKey

TD_COMM_LEN = 16
TD_PATH_LEN = 256


class Hook(enum.IntEnum):
    EXEC = 1
    MMAP = 2
    MPROTECT = 3
    TAMPER = 4
    SCRIPT = 5
    WRITE = 6


class Reason(enum.IntEnum):
    TRUSTED = 0
    UNTRUSTED = 1
    UNVERIFIABLE = 2
    CGROUP_ESCAPE = 3
    SIGNAL_SUPERVISOR = 4
    BPF = 5
    PTRACE = 6
    DB_WRITE = 7
    RAW_DEVICE = 8
    SYSCTL = 9
    KERNEL_LOAD = 10
    WRITABLE = 11
    ANON_EXEC = 12
    UNTRUSTED_SCRIPT = 13
    PROC_MEM = 14
    MODE_MOVE = 15


class Protect(enum.IntFlag):
    """Value bits of the lsm backend's `protected_inodes` map."""

    CONTENT = 1
    NAME = 2
    ENTRIES = 4


class ProgramFlag(enum.IntFlag):
    """Value bits of the `program_flags` map, keyed by a program's executable (its inode key)."""

    JIT = 1
    """May use anonymous executable memory (node, java, pypy, luajit)."""
    INTERPRETER = 2
    """May open a script file (.py, .sh, ...) only if its content is trusted (lsm)."""


class Verdict(enum.IntEnum):
    ALLOW = 0
    DENY = 1
    AUDIT_DENY = 2


class Mode(enum.IntEnum):
    ENFORCE = 0
    AUDIT = 1


class ModeRule(enum.IntEnum):
    """Which service rule set an event's mode (td_event.mode_rule)."""

    DEFAULT = 0
    UID = 1
    CGROUP = 2


class BackendId(enum.IntEnum):
    TRACEPOINT = 1
    LSM = 2


class CInodeKey(ctypes.Structure):
    _fields_ = [
        ("dev", ctypes.c_uint64),
        ("ino", ctypes.c_uint64),
        ("ctime_sec", ctypes.c_int64),
        ("ctime_nsec", ctypes.c_uint32),
        ("_pad", ctypes.c_uint32),
    ]

    @classmethod
    def from_key(cls, key: InodeKey) -> CInodeKey:
        return cls(key.dev, key.ino, key.ctime_sec, key.ctime_nsec, 0)

    def to_key(self) -> InodeKey:
        return InodeKey(self.dev, self.ino, self.ctime_sec, self.ctime_nsec)


class CTask(ctypes.Structure):
    """Value of the `confined` task storage map."""

    _fields_ = [
        ("confined", ctypes.c_uint8),
        ("_pad", ctypes.c_uint8 * 7),
    ]


class CFirstSeenGroup(ctypes.Structure):
    """The one value of the `first_seen_group` array: whose fanotify group vouches for
    inodes (tgid, fd in), and the group the `find_first_seen_group` iterator found (out)."""

    _fields_ = [
        ("tgid", ctypes.c_uint32),
        ("fd", ctypes.c_uint32),
        ("group", ctypes.c_uint64),
    ]


VOUCHED_BIT = 0x08
"""FAN_CLOSE_WRITE in an ignore mask of the first-seen handler's group: this inode's content
was verified as trusted and has not been modified since (bpf/vouch.bpf.h)."""


class CConfig(ctypes.Structure):
    """`const volatile struct td_config td_cfg`, set in .rodata before load."""

    _fields_ = [
        ("scope_cgroup_id", ctypes.c_uint64),
        ("scope_cgroup_level", ctypes.c_uint32),
        ("supervisor_tgid", ctypes.c_uint32),
        ("mode", ctypes.c_uint8),
        ("backend", ctypes.c_uint8),
        ("log_allows", ctypes.c_uint8),
        ("_pad", ctypes.c_uint8 * 5),
    ]


class CEvent(ctypes.Structure):
    _fields_ = [
        ("time_ns", ctypes.c_uint64),
        ("pid", ctypes.c_uint32),
        ("tgid", ctypes.c_uint32),
        ("ppid", ctypes.c_uint32),
        ("uid", ctypes.c_uint32),
        ("file", CInodeKey),
        ("hook", ctypes.c_uint8),
        ("verdict", ctypes.c_uint8),
        ("mode", ctypes.c_uint8),
        ("backend", ctypes.c_uint8),
        ("reason", ctypes.c_uint32),
        ("comm", ctypes.c_char * TD_COMM_LEN),
        ("path", ctypes.c_char * TD_PATH_LEN),
        ("mode_cgroup", ctypes.c_uint64),
        ("mode_rule", ctypes.c_uint8),
        ("_pad", ctypes.c_uint8 * 7),
    ]
