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
from trustdb.backends.interface import BackendError, Probe
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
