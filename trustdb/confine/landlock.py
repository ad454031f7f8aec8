"""Landlock (Linux 5.13+) through ctypes: an unprivileged, stackable allowlist of filesystem
access, TCP ports and IPC scopes that a process applies to itself and all its descendants,
and that no descendant can lift (a new ruleset can only narrow it).

The ABI is detected at run time and only what the kernel offers is asked for: ABI 1 files,
2 rename/link across directories (REFER), 3 truncate, 4 TCP bind/connect, 5 ioctl on devices,
6 signal and abstract-unix-socket scoping (7 adds audit flags, not used here).
"""

from __future__ import annotations

import ctypes
import os
import stat
from collections.abc import Iterable
from dataclasses import dataclass

from trustdb.confine.syscalls import ConfineError, libc

SYS_CREATE_RULESET = 444
SYS_ADD_RULE = 445
SYS_RESTRICT_SELF = 446
CREATE_RULESET_VERSION = 1
RULE_PATH_BENEATH = 1
RULE_NET_PORT = 2

# LANDLOCK_ACCESS_FS_*: bit i is the i-th right; ABI 1 has the first 13, later ABIs add one each.
(EXECUTE, WRITE_FILE, READ_FILE, READ_DIR, REMOVE_DIR, REMOVE_FILE, MAKE_CHAR, MAKE_DIR, MAKE_REG,
 MAKE_SOCK, MAKE_FIFO, MAKE_BLOCK, MAKE_SYM, REFER, TRUNCATE, IOCTL_DEV) = (1 << i for i in range(16))
INTRODUCED = {REFER: 2, TRUNCATE: 3, IOCTL_DEV: 5}
"""The ABI that introduced each right after ABI 1 (all others: ABI 1)."""


def fs_rights(abi: int) -> int:
    """Every filesystem right the kernel's Landlock ABI `abi` handles."""
    return sum(1 << i for i in range(16) if abi >= INTRODUCED.get(1 << i, 1))


FILE_ONLY = EXECUTE | WRITE_FILE | READ_FILE | TRUNCATE | IOCTL_DEV
"""The rights that mean something on a file (a rule on a file may hold only these)."""

READ = EXECUTE | READ_FILE | READ_DIR
WRITE = (WRITE_FILE | REMOVE_DIR | REMOVE_FILE | MAKE_CHAR | MAKE_DIR | MAKE_REG | MAKE_SOCK
         | MAKE_FIFO | MAKE_BLOCK | MAKE_SYM | REFER | TRUNCATE)

NET_BIND_TCP = 1 << 0  # ABI 4
NET_CONNECT_TCP = 1 << 1
SCOPE_ABSTRACT_UNIX_SOCKET = 1 << 0  # ABI 6
SCOPE_SIGNAL = 1 << 1


class _RulesetAttr(ctypes.Structure):
    _fields_ = [("handled_access_fs", ctypes.c_uint64), ("handled_access_net", ctypes.c_uint64),
                ("scoped", ctypes.c_uint64)]


class _PathBeneath(ctypes.Structure):
    _pack_ = 1
    _fields_ = [("allowed_access", ctypes.c_uint64), ("parent_fd", ctypes.c_int32)]


class _NetPort(ctypes.Structure):
    _fields_ = [("allowed_access", ctypes.c_uint64), ("port", ctypes.c_uint64)]


def abi_version() -> int:
    """0 when Landlock is missing or disabled (not built in, or not in the `lsm=` list)."""
    rc = libc.syscall(SYS_CREATE_RULESET, None, ctypes.c_size_t(0),
                      ctypes.c_uint32(CREATE_RULESET_VERSION))
    return max(rc, 0)


@dataclass(frozen=True)
class Rules:
    """What the confined tree may do; everything handled and not granted is denied."""

    read_write: tuple[str, ...] = ()
    read_only: tuple[str, ...] = ()
    devices: tuple[str, ...] = ()
    """Read-write plus ioctl (terminals, /dev/null)."""
    restrict_network: bool = True
    connect_tcp: tuple[int, ...] = ()
    bind_tcp: tuple[int, ...] = ()
    scope_ipc: bool = True
    """No signals to, and no abstract unix sockets of, processes outside the tree (ABI 6)."""


@dataclass(frozen=True)
class Enforced:
    abi: int
    network: bool
    """TCP ports are restricted (ABI 4+); False: the network is as the policy would not have it."""
    scoped: bool


def _fail(what: str) -> ConfineError:
    return ConfineError(f"landlock {what}: {os.strerror(ctypes.get_errno())}")


class Ruleset:
    """Built (in the child, inside its mount namespace) before the gate; `enforce()` right
    before exec. An O_CLOEXEC fd: nothing the tree runs inherits it."""

    def __init__(self, rules: Rules, abi: int | None = None) -> None:
        self.abi = abi_version() if abi is None else abi
        if self.abi < 1:
            raise ConfineError("landlock is not available on this kernel")
        fs = fs_rights(self.abi)
        net = (NET_BIND_TCP | NET_CONNECT_TCP) if self.abi >= 4 and rules.restrict_network else 0
        scoped = (SCOPE_ABSTRACT_UNIX_SOCKET | SCOPE_SIGNAL) if self.abi >= 6 and rules.scope_ipc else 0
        attr = _RulesetAttr(fs, net, scoped)
        size = 8 if self.abi < 4 else 16 if self.abi < 6 else 24
        self.fd = libc.syscall(SYS_CREATE_RULESET, ctypes.byref(attr), ctypes.c_size_t(size),
                               ctypes.c_uint32(0))
        if self.fd < 0:
            raise _fail("create_ruleset")
        self._fs = fs
        self.enforced = Enforced(abi=self.abi, network=bool(net), scoped=bool(scoped))
        try:
            self._paths(rules.read_only, READ)
            self._paths(rules.read_write, READ | WRITE)
            self._paths(rules.devices, READ | WRITE | IOCTL_DEV)
            if net:
                self._ports(rules.connect_tcp, NET_CONNECT_TCP)
                self._ports(rules.bind_tcp, NET_BIND_TCP)
        except BaseException:
            os.close(self.fd)
            raise

    def _paths(self, paths: Iterable[str], access: int) -> None:
        for path in paths:
            try:
                fd = os.open(path, os.O_PATH | os.O_CLOEXEC)
            except OSError:
                continue  # gone since the policy was resolved: nothing to grant
            try:
                allowed = access & self._fs
                if not stat.S_ISDIR(os.fstat(fd).st_mode):
                    allowed &= FILE_ONLY
                rule = _PathBeneath(allowed, fd)
                if libc.syscall(SYS_ADD_RULE, self.fd, RULE_PATH_BENEATH, ctypes.byref(rule),
                                0) != 0:
                    raise _fail(f"add_rule {path}")
            finally:
                os.close(fd)

    def _ports(self, ports: Iterable[int], access: int) -> None:
        for port in ports:
            rule = _NetPort(access, port)
            if libc.syscall(SYS_ADD_RULE, self.fd, RULE_NET_PORT, ctypes.byref(rule), 0) != 0:
                raise _fail(f"add_rule port {port}")

    def enforce(self) -> None:
        """Restrict this thread (single-threaded child) and everything it will exec."""
        if libc.syscall(SYS_RESTRICT_SELF, self.fd, 0) != 0:
            raise _fail("restrict_self")
        os.close(self.fd)
