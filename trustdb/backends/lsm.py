"""The `lsm` backend: BPF LSM programs (bpf/lsm.bpf.c) that answer EPERM before untrusted code runs.

The strongest backend: exec, executable mappings and mprotect are refused by the kernel instead of
killed after the fact, a `#!` script is checked itself (not only its interpreter), and a confined
tree cannot call bpf(), signal or ptrace the supervisor (or ptrace anything unconfined), write or
move the trust database, leave its cgroup through cgroup.procs, load kernel modules or write
/proc/sys. Needs a kernel built with CONFIG_BPF_LSM and booted with `bpf` in `lsm=`; elsewhere
the probe fails with the reason, and the engine falls back to `tracepoint`.
"""

from __future__ import annotations

import errno
import os
from collections.abc import Iterable
from pathlib import Path

from trustdb.abi import BackendId, CInodeKey, Protect
from trustdb.backends.bpfobject import BpfBackend, _first_line
from trustdb.backends.interface import COMMON_HOLES, BackendError, Probe
from trustdb.libbpf import LibbpfError
from trustdb.model import InodeKey

ACTIVE_LSMS = Path("/sys/kernel/security/lsm")
# What a trust database directory holds (trustdb/db.py): the data file holds the trust; LMDB's
# lock file only reader slots (readers open it for writing) and writer.lock the writers' flock,
# so those two get name protection only.
_DB_FILES = {
    "data.mdb": Protect.CONTENT | Protect.NAME,
    "lock.mdb": Protect.NAME,
    "writer.lock": Protect.NAME,
}


class LsmBackend(BpfBackend):
    name = "lsm"
    strength = 20
    object_name = "lsm.bpf.o"
    backend_id = BackendId.LSM
    probe_programs = ("handle_exec",)
    guarantees = (
        "exec (the script itself for #!), executable mappings (shared libraries, ld.so ./x, "
        "LD_PRELOAD, dlopen, the ELF interpreter) and mprotect(PROT_EXEC) of untrusted content "
        "or of files with writers get EPERM before anything runs; in `run`: code the process "
        "wrote itself (anonymous exec memory, W+X, SHM_EXEC) gets EPERM and an executable stack "
        "is killed, unless the program is flagged JIT; writes to trusted or mapped code and to "
        "/proc/PID/mem get EPERM; interpreters flagged so open only trusted scripts; no bpf(), "
        "no signal or ptrace to the supervisor or unconfined tasks, no write to the trust "
        "database, no cgroup escape, no module load, no sysctl or raw device write."
    )
    holes = (
        ("script-names-in-kernel: the kernel's file_open check judges an interpreter's opens of "
        "files named like scripts (.py .pyc .pl .pm .rb .sh .js .lua .php .tcl); the script a "
        "command line names by any other name (a symlink, /dev/fd/N, evil.zip on PYTHONPATH, "
        "awk -f, BASH_ENV) is refused by the supervisor's fanotify handler instead (EPERM as "
        "well; it stops judging if the supervisor dies, the kernel check does not); the kernel "
        "check cannot see a multi-call binary's applet, so `busybox cat x.sh` is refused here "
        "(a false denial; the tracepoint backend's handler reads the applet and allows it)"),
        ("execstack-kill: an executable stack is found after exec's point of no return: the "
        "process is killed (SIGKILL), not refused with EPERM"),
        ("exec-inodes-lru: files mapped executable in the tree are remembered in a 65536-entry "
        "LRU; past that the oldest lose their write protection (trusted files keep theirs)"),
        ("read-implies-exec-brk: after personality(READ_IMPLIES_EXEC) the heap grown by brk() is "
        "executable with no LSM hook on it; `run`'s seccomp refuses personality()"),
        *COMMON_HOLES,
    )

    def probe(self) -> Probe:
        try:
            found = super().probe()
        except LibbpfError as e:  # defensive: the base class already turns these into a Probe
            found = Probe(False, f"{self.name}: {_first_line(e)}")
        if not found.ok:
            if _says_eperm(found.reason):
                return Probe(False, f"{found.reason} (this kernel refuses BPF LSM programs)")
            return found
        # A kernel accepts and attaches BPF LSM programs that never run when `bpf` is missing
        # from the active LSM list (seen on Debian 6.12 booted without it): a load is no proof.
        # Check the list, and if it cannot be read, do not guess.
        active = active_lsms()
        if active is None:
            return Probe(
                False,
                f"{self.name}: cannot tell whether BPF LSM is active "
                f"({ACTIVE_LSMS} unreadable: is securityfs mounted?)",
            )
        if "bpf" not in active:
            return Probe(
                False,
                f"{self.name}: BPF LSM not active (lsm={','.join(active)}; "
                "boot with bpf in lsm= to use it)",
            )
        return found

    def protect_database(self, db_dir: Path) -> None:
        """Refuse confined tasks any change to the trust database at `db_dir`: writing or
        truncating its data file, unlinking, renaming or mounting over its files, its directory
        or any directory above it. Call after load(), before attach()."""
        db_dir = Path(os.path.realpath(db_dir))
        entries: dict[Path, Protect] = {db_dir: Protect.NAME | Protect.ENTRIES}
        for parent in db_dir.parents:
            entries[parent] = Protect.NAME
        for name, flags in _DB_FILES.items():
            if (db_dir / name).exists():
                entries[db_dir / name] = flags
        self.protect(entries.items())

    def protect(self, entries: Iterable[tuple[Path, Protect]]) -> None:
        """Add (path, flags) pairs to the kernel's protected-inode map (by device and inode)."""
        obj = self._obj
        if obj is None:
            raise BackendError(f"{self.name}: protect before load")
        m = obj.map("protected_inodes")
        for path, flags in entries:
            try:
                st = os.stat(path)
            except OSError as e:
                raise BackendError(f"{self.name}: cannot protect {path}: {e.strerror}") from e
            ident = InodeKey.from_stat(st)
            key = CInodeKey.from_key(InodeKey(ident.dev, ident.ino, 0, 0))
            try:
                m.update(bytes(key), int(flags).to_bytes(4, "little"))
            except LibbpfError as e:
                raise BackendError(f"{self.name}: cannot protect {path}: {e.strerror}") from e


def active_lsms() -> list[str] | None:
    """The kernel's active LSMs in order, or None if securityfs is not readable here."""
    try:
        return ACTIVE_LSMS.read_text().strip().split(",")
    except OSError:
        return None


def _says_eperm(reason: str) -> bool:
    return os.strerror(errno.EPERM) in reason
