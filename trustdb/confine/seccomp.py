"""The seccomp filter of `trustdb run`: the syscalls a confined tree may not make.

The BPF programs decide what code may run; this filter removes the ways a confined root process
could switch them off or hide from them. It is a classic-BPF program built here by hand (there is
no libseccomp binding for this interpreter) and installed with seccomp(2) right before the
command is exec'd; every descendant inherits it and no process can remove it.

Each denied syscall returns EPERM (the caller sees an ordinary permission error and can carry on);
a syscall made through a foreign ABI (i386 `int 0x80`, x32) kills the process, because its numbers
would not be the ones checked here. `DENIED` below says why each entry is on the list.
"""

from __future__ import annotations

import ctypes
import errno
import os
import platform
import struct
from dataclasses import dataclass

# --- constants from <linux/seccomp.h>, <linux/filter.h>, <linux/audit.h> ---
SECCOMP_SET_MODE_FILTER = 1
SECCOMP_RET_KILL_PROCESS = 0x80000000
SECCOMP_RET_ERRNO = 0x00050000
SECCOMP_RET_ALLOW = 0x7FFF0000
PR_SET_NO_NEW_PRIVS = 38
AUDIT_ARCH_X86_64 = 0xC000003E

BPF_LD_W_ABS = 0x20  # BPF_LD | BPF_W | BPF_ABS
BPF_JEQ_K = 0x15  # BPF_JMP | BPF_JEQ | BPF_K
BPF_JGE_K = 0x35  # BPF_JMP | BPF_JGE | BPF_K
BPF_JSET_K = 0x45  # BPF_JMP | BPF_JSET | BPF_K
BPF_ALU_AND_K = 0x54  # BPF_ALU | BPF_AND | BPF_K
BPF_RET_K = 0x06  # BPF_RET | BPF_K

# struct seccomp_data: int nr; __u32 arch; __u64 instruction_pointer; __u64 args[6];
OFF_NR = 0
OFF_ARCH = 4


def _arg_lo(i: int) -> int:
    """Offset of the low 32 bits of syscall argument i (little-endian)."""
    return 16 + 8 * i


X32_SYSCALL_BIT = 0x40000000

CLONE_NEWNS = 0x00020000
CLONE_NEWCGROUP = 0x02000000
CLONE_NEWUTS = 0x04000000
CLONE_NEWIPC = 0x08000000
CLONE_NEWUSER = 0x10000000
CLONE_NEWPID = 0x20000000
CLONE_NEWNET = 0x40000000
CLONE_NEW_ANY = (
    CLONE_NEWNS
    | CLONE_NEWCGROUP
    | CLONE_NEWUTS
    | CLONE_NEWIPC
    | CLONE_NEWUSER
    | CLONE_NEWPID
    | CLONE_NEWNET
)
S_IFMT = 0o170000
READ_IMPLIES_EXEC = 0x0400000
PERSONALITY_QUERY = 0xFFFFFFFF


class SeccompError(Exception):
    """The filter could not be built or installed (one line)."""


# x86_64 syscall numbers (arch/x86/entry/syscalls/syscall_64.tbl).
X86_64 = {
    "ptrace": 101,
    "mknod": 133,
    "personality": 135,
    "pivot_root": 155,
    "mount": 165,
    "umount2": 166,
    "iopl": 172,
    "ioperm": 173,
    "init_module": 175,
    "delete_module": 176,
    "kexec_load": 246,
    "request_key": 249,
    "mknodat": 259,
    "unshare": 272,
    "perf_event_open": 298,
    "open_by_handle_at": 304,
    "setns": 308,
    "process_vm_writev": 311,
    "finit_module": 313,
    "kexec_file_load": 320,
    "bpf": 321,
    "userfaultfd": 323,
    "open_tree": 428,
    "move_mount": 429,
    "fsopen": 430,
    "fsconfig": 431,
    "fsmount": 432,
    "fspick": 433,
    "clone3": 435,
    "pidfd_getfd": 438,
    "mount_setattr": 442,
    "clone": 56,
    "ioctl": 16,
    "adjtimex": 159,
    "chroot": 161,
    "settimeofday": 164,
    "clock_settime": 227,
    "clock_adjtime": 305,
    "io_uring_setup": 425,
    "io_uring_enter": 426,
    "io_uring_register": 427,
    "fanotify_init": 300,
    "fanotify_mark": 301,
    "syslog": 103,
    "truncate": 76,
    "uselib": 134,
    "swapon": 167,
    "swapoff": 168,
    "acct": 163,
    "openat2": 437,
    "sethostname": 170,
    "setdomainname": 171,
    "socket": 41,
}
# x86_64 has no stime(2): glibc's stime() is settimeofday.

TIOCSTI = 0x5412
TIOCLINUX = 0x541C

DENIED: dict[str, str] = {
    # Switching the engine off or rewriting its state.
    "bpf": "detach programs, edit the trusted-inode map, load programs (bpftool is built on it)",
    "perf_event_open": "attach BPF or kprobes through perf, read kernel memory",
    # Reaching or altering other processes.
    "ptrace": "take over another confined process, or one it can see",
    "process_vm_writev": "write into another process's memory",
    "pidfd_getfd": "steal an open file (a map or a DB fd) from another process",
    # Changing the kernel itself.
    "init_module": "load kernel code",
    "finit_module": "load kernel code",
    "delete_module": "unload kernel code",
    "kexec_load": "boot another kernel",
    "kexec_file_load": "boot another kernel",
    "iopl": "raw port I/O",
    "ioperm": "raw port I/O",
    # Changing what the filesystem shows: the trust DB and bpffs are covered by mounts.
    "mount": "uncover the trust DB, /sys/fs/bpf or the host /proc",
    "umount2": "uncover the trust DB, /sys/fs/bpf or the host /proc",
    "pivot_root": "swap the root the covers are mounted on",
    "open_tree": "clone a mount from before the covers (new mount API)",
    "move_mount": "new mount API",
    "fsopen": "new mount API",
    "fsconfig": "new mount API",
    "fsmount": "new mount API",
    "fspick": "remount a filesystem read-write (new mount API)",
    "mount_setattr": "make a read-only mount writable",
    "open_by_handle_at": "open a covered file by its handle, past every mount (the 'shocker' escape)",
    # New namespaces: none lifts the BPF mark, but each widens what is reachable (a user
    # namespace gives full capabilities over new namespaces and a large kernel surface; setns
    # could enter the host mount namespace, where the DB is visible). Denied as a whole: one
    # rule that is easy to audit. clone(2) with a CLONE_NEW* flag is denied below.
    "unshare": "create namespaces (unshare -C, -U, -m ...)",
    "setns": "enter another namespace (the host's mount namespace shows the DB)",
    # Kernel upcalls that start a helper outside the confined tree.
    "request_key": "makes the kernel run /sbin/request-key as root outside the confined tree",
    # Kernel-exploit primitives with no use for a confined command.
    "userfaultfd": "stalls kernel copies at will: the usual way to win kernel races",
    # The clock: an inode key holds ctime, and ctime follows CLOCK_REALTIME. Setting the clock
    # back, rewriting a trusted file and setting it again would forge the old key (issue 8,
    # route 4). CAP_SYS_TIME is dropped too (trustdb.confine.hardening); this is the second lock.
    "clock_settime": "set CLOCK_REALTIME back to forge a trusted file's ctime",
    "settimeofday": "set CLOCK_REALTIME back to forge a trusted file's ctime",
    "adjtimex": "step or slew the clock (forge ctime)",
    "clock_adjtime": "step or slew the clock (forge ctime)",
    # chroot: a root of its own supplies its own /lib64/ld-linux-x86-64.so.2 and /etc/ld.so.*
    # to every exec (issue 8, route 2); it also moves the path the covers are judged at.
    "chroot": "supply a private ELF interpreter and library paths to exec",
    # io_uring performs opens, reads and writes from kernel workers, outside this filter and
    # outside the per-syscall view of every other check.
    "io_uring_setup": "run syscalls from kernel workers, out of this filter's sight",
    "io_uring_enter": "run syscalls from kernel workers, out of this filter's sight",
    "io_uring_register": "run syscalls from kernel workers, out of this filter's sight",
    # A permission mark (FAN_OPEN_PERM on a mount or filesystem) made from inside would hold up
    # and deny opens and execs of processes outside the tree, the supervisor's included.
    "fanotify_init": "deny or stall file opens of processes outside the tree",
    "fanotify_mark": "deny or stall file opens of processes outside the tree",
    # truncate(2) changes a file's content by path, with no open and so no permission event:
    # a trusted library another task has mapped would be emptied, then rewritten through a
    # write open of what is now untrusted content (issue 8, route 3). ftruncate(2) needs an fd
    # open for writing, which the write-open check already judges; coreutils' truncate uses it.
    "truncate": "empty a trusted file by path, past the write-open check (no open event)",
    # Kernel-made opens for writing that no open syscall shows (and host-wide effects).
    "swapon": "the kernel opens the file read-write and writes swapped pages into it",
    "swapoff": "host-wide swap",
    "acct": "the kernel opens the file for writing and appends to it",
    # uselib(2) maps a library by path from inside the kernel (an old a.out door).
    "uselib": "map a library by path without open or mmap",
    # The tree shares the host's UTS namespace and kernel log.
    "syslog": "read or clear the host's kernel log",
    "sethostname": "rename the host (shared UTS namespace)",
    "setdomainname": "rename the host's NIS domain (shared UTS namespace)",
}

DENIED_IOCTLS: dict[int, str] = {
    TIOCSTI: "TIOCSTI: push keystrokes into a terminal (the user's shell runs them after run)",
    TIOCLINUX: "TIOCLINUX: paste the console selection into a terminal's input",
}
"""ioctl(2) requests denied whatever the fd (issue 8, route 6)."""


@dataclass(frozen=True, slots=True)
class Instruction:
    code: int
    jt: int
    jf: int
    k: int


def _stmt(code: int, k: int) -> Instruction:
    return Instruction(code, 0, 0, k)


def _ret_errno(err: int) -> Instruction:
    return _stmt(BPF_RET_K, SECCOMP_RET_ERRNO | (err & 0xFFFF))


AF_INET, AF_INET6 = 2, 10
SOCK_STREAM, SOCK_DGRAM = 1, 2
SOCK_TYPE_MASK = 0xF
IPPROTO_TCP, IPPROTO_UDP = 6, 17


def _ip_sockets(allowed: tuple[tuple[int, int], ...]) -> list[Instruction]:
    """socket(domain, type, protocol) for AF_INET/AF_INET6: only the (type, protocol) pairs in
    `allowed` (protocol 0 means the type's default). Everything else (UDP, ICMP ping sockets,
    SCTP, MPTCP, raw) gets EACCES, as Landlock answers a refused TCP connect. Other domains
    pass (AF_UNIX; AF_PACKET and raw sockets need the CAP_NET_RAW the tree does not have)."""
    ALLOW = -1  # a jump target: the final `allow`
    body: list[tuple[int, int | None, int | None, int]] = [
        (BPF_LD_W_ABS, None, None, _arg_lo(0)),
        (BPF_JEQ_K, 1, 0, AF_INET),
        (BPF_JEQ_K, 0, ALLOW, AF_INET6),
    ]
    for sock_type, protocol in allowed:
        body += [
            (BPF_LD_W_ABS, None, None, _arg_lo(1)),
            (BPF_ALU_AND_K, None, None, SOCK_TYPE_MASK),
            (BPF_JEQ_K, 0, 3, sock_type),
            (BPF_LD_W_ABS, None, None, _arg_lo(2)),
            (BPF_JEQ_K, ALLOW, 0, 0),
            (BPF_JEQ_K, ALLOW, 0, protocol),
        ]
    end = len(body) + 1  # index of the final allow (after the EACCES return)

    def target(k: int, jump: int | None) -> int:
        return end - k - 1 if jump == ALLOW else jump or 0

    out = [Instruction(code, target(k, jt), target(k, jf), v) for k, (code, jt, jf, v)
           in enumerate(body)]
    return [*out, _ret_errno(errno.EACCES), _stmt(BPF_RET_K, SECCOMP_RET_ALLOW)]


def _argument_checks(nr: dict[str, int], *,
                     ip_sockets: tuple[tuple[int, int], ...] | None = None
                     ) -> list[list[Instruction]]:
    """Syscalls denied only for some arguments; each block starts with the accumulator = nr
    and falls through (to the next block) when the syscall is not its own."""
    blocks: list[list[Instruction]] = []

    def block(name: str, body: list[Instruction]) -> None:
        # if nr != name: skip the body
        blocks.append([Instruction(BPF_JEQ_K, 0, len(body), nr[name]), *body])

    allow = _stmt(BPF_RET_K, SECCOMP_RET_ALLOW)
    eperm = _ret_errno(errno.EPERM)
    # clone(flags, ...): fork and threads yes, new namespaces no (see `unshare` above).
    block(
        "clone",
        [
            _stmt(BPF_LD_W_ABS, _arg_lo(0)),
            Instruction(BPF_JSET_K, 0, 1, CLONE_NEW_ANY),
            eperm,
            allow,
        ],
    )
    # clone3 passes its flags in memory, out of a filter's reach: answer ENOSYS so that libc
    # falls back to clone(2), whose flags are checked above (what container runtimes do).
    block("clone3", [_ret_errno(errno.ENOSYS)])
    # openat2 passes its flags in memory too (struct open_how): the write-open check reads an
    # open's flags from /proc/PID/syscall, and another thread can rewrite that memory while
    # the open waits in the permission event. ENOSYS: glibc never needs it, and callers that
    # try it (systemd, some runtimes) fall back to openat(2), whose flags are registers.
    block("openat2", [_ret_errno(errno.ENOSYS)])
    # mknod/mknodat: FIFOs and sockets yes; device nodes no (a block device bypasses every
    # mount cover; /dev/mem is all of memory).
    for name, arg in (("mknod", 1), ("mknodat", 2)):
        block(
            name,
            [
                _stmt(BPF_LD_W_ABS, _arg_lo(arg)),
                _stmt(BPF_ALU_AND_K, S_IFMT),
                Instruction(BPF_JEQ_K, 2, 0, 0o020000),  # S_IFCHR
                Instruction(BPF_JEQ_K, 1, 0, 0o060000),  # S_IFBLK
                allow,
                eperm,
            ],
        )
    # personality(READ_IMPLIES_EXEC) would make every PROT_READ mapping executable without the
    # PROT_EXEC an mmap hook looks for. The query value 0xffffffff is allowed.
    block(
        "personality",
        [
            _stmt(BPF_LD_W_ABS, _arg_lo(0)),
            Instruction(BPF_JEQ_K, 2, 0, PERSONALITY_QUERY),
            Instruction(BPF_JSET_K, 0, 1, READ_IMPLIES_EXEC),
            eperm,
            allow,
        ],
    )
    # ioctl(fd, request): the request is an unsigned int; compare its low 32 bits.
    body = [_stmt(BPF_LD_W_ABS, _arg_lo(1))]
    for i, request in enumerate(DENIED_IOCTLS):
        body.append(Instruction(BPF_JEQ_K, len(DENIED_IOCTLS) - i, 0, request))
    block("ioctl", [*body, allow, eperm])
    # socket(AF_INET*, ...): only what the policy's network rules can see (Landlock: TCP).
    if ip_sockets is not None:
        block("socket", _ip_sockets(ip_sockets))
    return blocks


TCP_ONLY = ((SOCK_STREAM, IPPROTO_TCP),)
TCP_AND_UDP = ((SOCK_STREAM, IPPROTO_TCP), (SOCK_DGRAM, IPPROTO_UDP))


def build_filter(machine: str | None = None, *,
                 ip_sockets: tuple[tuple[int, int], ...] | None = None) -> list[Instruction]:
    """The whole program for this machine's architecture (x86_64 only, for now).
    `ip_sockets`: the only IP socket kinds allowed (TCP_ONLY, TCP_AND_UDP; None: any), where
    the policy restricts the network: Landlock's port rules leave UDP and the rest open."""
    machine = machine or platform.machine()
    if machine != "x86_64":
        raise SeccompError(f"no seccomp syscall table for {machine}: trustdb run needs x86_64")
    nr = X86_64
    prog: list[Instruction] = [
        _stmt(BPF_LD_W_ABS, OFF_ARCH),
        Instruction(BPF_JEQ_K, 1, 0, AUDIT_ARCH_X86_64),
        _stmt(BPF_RET_K, SECCOMP_RET_KILL_PROCESS),
        _stmt(BPF_LD_W_ABS, OFF_NR),
        # x32 ABI numbers have bit 30 set: a second syscall table this filter does not cover.
        Instruction(BPF_JGE_K, 0, 1, X32_SYSCALL_BIT),
        _stmt(BPF_RET_K, SECCOMP_RET_KILL_PROCESS),
    ]
    for name in DENIED:
        prog += [Instruction(BPF_JEQ_K, 0, 1, nr[name]), _ret_errno(errno.EPERM)]
    for block in _argument_checks(nr, ip_sockets=ip_sockets):
        prog += block
        # Every block body ends in a return, so the accumulator (nr) is intact for the next.
    prog.append(_stmt(BPF_RET_K, SECCOMP_RET_ALLOW))
    if len(prog) > 4096:
        raise SeccompError("seccomp filter too long")
    return prog


def encode(prog: list[Instruction]) -> bytes:
    """struct sock_filter[]: u16 code, u8 jt, u8 jf, u32 k."""
    return b"".join(struct.pack("=HBBI", i.code, i.jt, i.jf, i.k) for i in prog)


class _SockFprog(ctypes.Structure):
    _fields_ = [("len", ctypes.c_ushort), ("filter", ctypes.c_void_p)]


_SYS_SECCOMP = 317  # x86_64


def install(prog: list[Instruction]) -> None:
    """Install `prog` on the calling thread (the single thread of the child about to exec).

    Sets no_new_privs first: setuid binaries do not gain privileges in the confined tree, and
    the filter can never be dropped by exec'ing something privileged."""
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) != 0:
        err = ctypes.get_errno()
        raise SeccompError(f"prctl(PR_SET_NO_NEW_PRIVS): {os.strerror(err)}")
    raw = encode(prog)
    buf = ctypes.create_string_buffer(raw, len(raw))
    fprog = _SockFprog(len(prog), ctypes.cast(buf, ctypes.c_void_p))
    rc = libc.syscall(_SYS_SECCOMP, SECCOMP_SET_MODE_FILTER, 0, ctypes.byref(fprog))
    if rc != 0:
        err = ctypes.get_errno()
        raise SeccompError(f"seccomp(SET_MODE_FILTER): {os.strerror(err)}")
