"""Filesystem identity: which inode key the kernel's hooks will see for a file (stat ->
`InodeKey`, overlayfs resolved, btrfs refused), and when a file's ctime is settled enough for
that key to stand for its content. The rules are explained in `trustdb.mirror`'s docstring.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import platform
import re
import stat as statmod
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from trustdb.model import InodeKey

OVERLAYFS_SUPER_MAGIC = 0x794C7630
BTRFS_SUPER_MAGIC = 0x9123683E
EXT4_SUPER_MAGIC = 0xEF53
XFS_SUPER_MAGIC = 0x58465342
TMPFS_MAGIC = 0x01021994

REASON_OVERLAY_UNRESOLVED = (
    "on overlayfs: the real inode behind it could not be resolved (layers on another "
    "filesystem, or a nested overlay); not mirrored"
)

UNKEYABLE_FS: dict[int, str] = {
    BTRFS_SUPER_MAGIC: "on btrfs: stat() reports the subvolume's device, not the kernel's; "
    "not mirrored",
}
"""Filesystems where `InodeKey.from_stat` is not the key the BPF hooks compute (overlayfs is
resolved instead: see `overlay_real_stat`)."""

MULTIGRAIN_FS = frozenset({EXT4_SUPER_MAGIC, XFS_SUPER_MAGIC, BTRFS_SUPER_MAGIC, TMPFS_MAGIC})
"""Filesystems converted to multigrain timestamps in Linux 6.13: after anyone stat()s a file,
its next change gets a fresh fine-grained ctime, so the coarse-ctime hole does not exist."""

MULTIGRAIN_KERNEL = (6, 13)

CLOCK_REALTIME_COARSE = 5
"""Linux clock id (Python 3.11 has no constant): current_time() stamps ctime from this clock."""

MAX_CTIME_WAIT_NS = 2_100_000_000
"""Longest wait for a file's ctime tick to pass (a filesystem with 2 s timestamps)."""


class _StatFs(ctypes.Structure):
    # Only f_type is read; the rest is room for the kernel's struct statfs (120 bytes on LP64).
    _fields_ = [("f_type", ctypes.c_long), ("_rest", ctypes.c_byte * 160)]


# CDLL(None): libc is already mapped; find_library would run ldconfig and gcc at import,
# which the service denies (and which costs a fork per import).
_libc = ctypes.CDLL(None, use_errno=True)
_libc.statfs.argtypes = [ctypes.c_char_p, ctypes.POINTER(_StatFs)]
_libc.fstatfs.argtypes = [ctypes.c_int, ctypes.POINTER(_StatFs)]


def fs_magic(target: str | int) -> int:
    """f_type of the filesystem holding a path or an open fd (statfs(2); os.statvfs lacks it)."""
    buf = _StatFs()
    if isinstance(target, int):
        rc = _libc.fstatfs(target, ctypes.byref(buf))
    else:
        rc = _libc.statfs(os.fsencode(target), ctypes.byref(buf))
    if rc != 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))
    return buf.f_type & 0xFFFFFFFF


def kernel_has_multigrain(release: str | None = None) -> bool:
    """True on kernels >= 6.13 (multigrain ctime on ext4, xfs, btrfs, tmpfs)."""
    parts = (release or platform.release()).split(".")
    try:
        version = (int(parts[0]), int("".join(c for c in parts[1] if c.isdigit()) or 0))
    except (IndexError, ValueError):
        return False
    return version >= MULTIGRAIN_KERNEL


def coarse_now_ns() -> int:
    return time.clock_gettime_ns(CLOCK_REALTIME_COARSE)


COARSE_TICK_NS = int(time.clock_getres(CLOCK_REALTIME_COARSE) * 1e9)
"""How far the coarse clock may lag the real one (a jiffy: 4 ms at HZ=250)."""


def wait_for_coarse_clock(until_ns: int) -> None:
    """Sleep until CLOCK_REALTIME_COARSE reads at least `until_ns`. The coarse clock lags real
    time by up to a tick, so sleeping the bare difference can end before it moves."""
    wait = until_ns - coarse_now_ns()
    if wait > 0:
        time.sleep((min(wait, MAX_CTIME_WAIT_NS) + COARSE_TICK_NS) / 1e9)


def ctime_settled_at(st: os.stat_result) -> int:
    """The coarse clock value after which any new ctime stamp differs from this file's.

    Filesystems truncate timestamps to their granularity, which the trailing zeros of the
    nanoseconds reveal: 100 ns (cifs, ntfs), 10 ms (exfat); zero nanoseconds is taken as a
    filesystem that keeps seconds or, like vfat, two. One clock unit past that, a write to this
    inode, or a new inode that reuses its number, gets another ctime and so another key."""
    nsec = st.st_ctime_ns % 1_000_000_000
    if nsec == 0:
        return st.st_ctime_ns + 2_000_000_000
    granularity = 1
    while granularity < 100_000_000 and nsec % (granularity * 10) == 0:
        granularity *= 10
    return st.st_ctime_ns + granularity


# --- overlayfs: two inodes per file ------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class OverlayMount:
    mount_point: str
    layers: tuple[str, ...]
    """upperdir first (if any), then the lowerdirs, top to bottom: where a name is looked up."""


def _unescape(text: str) -> str:
    # mountinfo writes space, tab, newline and backslash as \ooo octal escapes.
    return re.sub(r"\\([0-7]{3})", lambda m: chr(int(m.group(1), 8)), text)


def _split_layers(value: str) -> list[str]:
    # lowerdir=/a:/b (":" inside a name is written "\:"); "::" marks data-only layers.
    parts = re.split(r"(?<!\\):+", value)
    return [p.replace("\\:", ":") for p in parts if p]


def overlay_mounts(mountinfo: str = "/proc/self/mountinfo") -> list[OverlayMount]:
    """Every overlayfs mount this process sees, with its layer directories."""
    mounts = []
    with open(mountinfo, encoding="utf-8", errors="surrogateescape") as f:
        for line in f:
            pre, _, post = line.partition(" - ")
            fields, tail = pre.split(), post.split()
            if len(fields) < 5 or len(tail) < 3 or tail[0] != "overlay":
                continue
            upper: list[str] = []
            lower: list[str] = []
            for opt in _unescape(tail[2]).split(","):
                key, _, value = opt.partition("=")
                if key == "upperdir":
                    upper = [value]
                elif key == "lowerdir":
                    lower += _split_layers(value)
                elif key in ("lowerdir+", "datadir+"):
                    lower.append(value)
            mounts.append(OverlayMount(_unescape(fields[4]), tuple(upper + lower)))
    return mounts


def overlay_real_stat(
    path: str, st: os.stat_result, mounts: Sequence[OverlayMount] | None = None
) -> os.stat_result | str:
    """stat() of the real file behind `path` on overlayfs, or why it cannot be trusted to be.

    Measured on 6.18 (tests/engine/test_mirror.py): an exec sees the overlay inode, which
    stat() on the merged path reports exactly, but a mapping (ld.so, shared libraries) sees the
    real inode in the layer, with the same inode number and ctime on another device. The real
    file is the first layer holding the name; it is accepted only if its inode number, ctime
    and size are the merged file's, i.e. all layers are on one filesystem (docker's overlay2)."""
    real = os.path.realpath(path)
    candidates = [m for m in overlay_mounts() if real.startswith(m.mount_point.rstrip("/") + "/")]
    if not candidates:
        return REASON_OVERLAY_UNRESOLVED
    mount = max(candidates, key=lambda m: len(m.mount_point))
    try:
        if os.stat(mount.mount_point).st_dev != st.st_dev:
            return REASON_OVERLAY_UNRESOLVED  # a per-layer st_dev: not the overlay inode's
    except OSError:
        return REASON_OVERLAY_UNRESOLVED
    rel = os.path.relpath(real, mount.mount_point)
    for layer in mount.layers:
        try:
            lst = os.lstat(os.path.join(layer, rel))
        except OSError:
            continue
        same = (lst.st_ino, lst.st_ctime_ns, lst.st_size) == (st.st_ino, st.st_ctime_ns, st.st_size)
        if not same or not statmod.S_ISREG(lst.st_mode):
            return REASON_OVERLAY_UNRESOLVED
        try:
            if fs_magic(os.path.join(layer, rel)) in (*UNKEYABLE_FS, OVERLAYFS_SUPER_MAGIC):
                return REASON_OVERLAY_UNRESOLVED
        except OSError:
            return REASON_OVERLAY_UNRESOLVED
        return lst
    return REASON_OVERLAY_UNRESOLVED


def kernel_keys(
    path: str,
    st: os.stat_result,
    magic: int,
    mounts: Callable[[], Sequence[OverlayMount]] = overlay_mounts,
) -> tuple[InodeKey, ...] | str:
    """The keys the BPF hooks will compute for this file: one, or two on overlayfs (the overlay
    inode for exec, the real one for mappings); or why the file cannot be keyed. `mounts` gives
    the overlay mounts (a sync reads /proc/self/mountinfo once, not once per file)."""
    if magic in UNKEYABLE_FS:
        return UNKEYABLE_FS[magic]
    key = InodeKey.from_stat(st)
    if magic != OVERLAYFS_SUPER_MAGIC:
        return (key,)
    real = overlay_real_stat(path, st, mounts())
    if isinstance(real, str):
        return real
    return (key, InodeKey.from_stat(real))
