"""Remembered CO-RE targets: the kernel's BTF cut down to what one BPF object reads.

Each load of a BPF object makes libbpf look up every kernel type the object reads by name, in
a linear pass over the whole kernel BTF per type (32 types, ~150k BTF types here: ~25 ms of
`trustdb run`'s start, on its critical path). `bpftool gen min_core_btf` writes the part of the
kernel's BTF those relocations use; libbpf relocates against that instead (`btf_custom_path`)
and still attaches by the kernel's own BTF. The kernel's verifier checks every access either
way.

A wrong file here would point the programs at other fields: a fail-open. So:
- written only by root outside any tree, at the end of a `trustdb run` that loaded the object
  the slow way, and only after a second load against the new file produced exactly the same
  relocated instructions as that load (`BpfObject.relocated_programs`);
- where: `$STATE_DIR/core-btf/` (/run/trustdb, a tmpfs: gone at reboot). Every `run` covers
  STATE_DIR with an empty read-only mount, whatever its policy grants (trustdb.confine.mounts),
  and creates it before its tree starts, so that a tree with /run writable cannot create it
  either; every directory from / down and the file must be root's and writable by no one else,
  and the file is opened without following symlinks and handed to libbpf as that open fd;
- key: the boot id and kernel release (the kernel's BTF cannot change within a boot), the
  BTF objects the kernel lists (a module loaded since adds candidates), and the BLAKE3 of the
  object file; anything else is a miss;
- used for scoped engines only (`run`), never for the system-wide service;
- bpftool is run from a system tree only (/usr/sbin), never found through $PATH.
A failed load against a remembered file removes it and loads the slow way.
"""

from __future__ import annotations

import contextlib
import os
import stat
import subprocess
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from trustdb.probecache import path_is_root_only, root_only
from trustdb.state import STATE_DIR
from trustdb.system_trees import in_system_tree

if TYPE_CHECKING:
    from trustdb.libbpf import BpfObject

CORE_DIR_NAME = "core-btf"
KERNEL_BTF = Path("/sys/kernel/btf")
BPFTOOL_PATHS = ("/usr/sbin/bpftool", "/usr/bin/bpftool", "/sbin/bpftool")
_MAX_BYTES = 4 << 20
_BPFTOOL_TIMEOUT_S = 30


def core_dir() -> Path:
    return STATE_DIR / CORE_DIR_NAME


def current_key(object_path: Path) -> str | None:
    """The name of `object_path`'s remembered file on this boot and kernel; None if the key
    cannot be made."""
    import blake3

    try:
        boot_id = Path("/proc/sys/kernel/random/boot_id").read_text().strip()
        btfs = ",".join(sorted(os.listdir(KERNEL_BTF)))
        digest = blake3.blake3(object_path.read_bytes()).hexdigest()
    except OSError:
        return None
    kernel = blake3.blake3(f"{boot_id}\0{os.uname().release}\0{btfs}".encode()).hexdigest()
    return f"{digest[:32]}-{kernel[:32]}.btf"


@contextlib.contextmanager
def recalled(key: str) -> Iterator[str | None]:
    """A path libbpf can open for the remembered file of `key` (/proc/self/fd/N of our own
    checked open, valid inside the block), or None."""
    fd = _open_checked(core_dir() / key)
    try:
        yield f"/proc/self/fd/{fd}" if fd >= 0 else None
    finally:
        if fd >= 0:
            os.close(fd)


def _open_checked(path: Path) -> int:
    if not path_is_root_only(path.parent):
        return -1
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except OSError:
        return -1
    st = os.fstat(fd)
    if not stat.S_ISREG(st.st_mode) or not root_only(st) or st.st_size > _MAX_BYTES:
        os.close(fd)
        return -1
    return fd


def forget(key: str) -> None:
    with contextlib.suppress(OSError):
        (core_dir() / key).unlink()


@dataclass
class Pending:
    """Loads made the slow way in this process, to remember at its end (`write_pending`)."""

    loads: list[tuple[Path, str, Callable[[BpfObject], None], dict[str, bytes]]] = field(
        default_factory=list)


PENDING = Pending()


def note_slow_load(obj: BpfObject, key: str, replay: Callable[[BpfObject], None]) -> None:
    """`obj` was just loaded against the kernel's whole BTF: remember its relocated programs,
    and how to set up a copy (`replay`), for `write_pending` (once per key)."""
    if all(k != key for _, k, _, _ in PENDING.loads):
        PENDING.loads.append((obj.path, key, replay, obj.relocated_programs()))


def write_pending() -> None:
    """Write the remembered file of every slow load noted (best effort; `trustdb run` calls it
    once its tree is gone). Each file is kept only if a load against it relocates exactly as
    the slow load did."""
    loads, PENDING.loads = PENDING.loads, []
    for path, key, replay, programs in loads:
        with contextlib.suppress(OSError, subprocess.SubprocessError):
            _write_one(path, key, replay, programs)


def _bpftool() -> str | None:
    for p in BPFTOOL_PATHS:
        real = os.path.realpath(p)
        if in_system_tree(real) and os.access(real, os.X_OK):
            return real
    return None


def _write_one(path: Path, key: str, replay: Callable[[BpfObject], None],
               programs: dict[str, bytes]) -> None:
    from trustdb.libbpf import BpfObject, LibbpfError

    tool = _bpftool()
    where = core_dir()
    if tool is None or os.geteuid() != 0:
        return
    where.mkdir(mode=0o755, parents=True, exist_ok=True)
    if not path_is_root_only(where):
        return
    tmp = where / f".{key}.{os.getpid()}.tmp"
    try:
        subprocess.run([tool, "gen", "min_core_btf", str(KERNEL_BTF / "vmlinux"), str(tmp),
                        str(path)], check=True, capture_output=True, timeout=_BPFTOOL_TIMEOUT_S,
                       env={"PATH": "/usr/sbin:/usr/bin:/sbin:/bin"},
                       umask=0o077)  # nobody else can open it before the chmod and the check
        os.chmod(tmp, 0o644)
        try:
            with BpfObject(path, core_btf=str(tmp)) as copy:
                replay(copy)
                copy.load(explain=False)
                same = copy.relocated_programs() == programs
        except LibbpfError:
            same = False
        if same:
            os.replace(tmp, where / key)
    finally:
        with contextlib.suppress(OSError):
            tmp.unlink()
