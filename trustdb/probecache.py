"""Remembered backend probes: what this kernel, since this boot, said to each BPF object.

A refused probe (BPF LSM on a kernel without it: 40-150 ms of verifier work for nothing) is
paid once per boot instead of on every `trustdb run`. A remembered answer is only trusted when
nothing but root could have written it, and only for the very kernel and object it was made
with; anything else is a miss and the backend is probed again (the probe then refreshes it):
- where: `$STATE_DIR/probes/<backend>-<object digest>.json` (/run/trustdb: a tmpfs that every `run` hides from
  its tree); every directory from / down and the file itself must be root's and writable by no
  one else, and the file is opened without following symlinks;
- key: the boot id (/proc/sys/kernel/random/boot_id: a new boot, maybe with another `lsm=` line,
  never reuses an answer), the kernel release, and the BLAKE3 of the object file (a rebuilt
  or upgraded object is probed again).
A planted "refused" would only push `run` to a weaker backend, which is why the file's owner
and the whole path are checked rather than trusted; a planted "ok" costs nothing: the backend's
real load is still its proof.
"""

from __future__ import annotations

import json
import os
import stat
from dataclasses import asdict, dataclass
from pathlib import Path

from trustdb.state import STATE_DIR

PROBE_DIR_NAME = "probes"
_MAX_BYTES = 64 * 1024


@dataclass(frozen=True, slots=True)
class ProbeKey:
    boot_id: str
    kernel: str
    object_blake3: str


@dataclass(frozen=True, slots=True)
class RememberedProbe:
    key: ProbeKey
    ok: bool
    reason: str


def current_key(object_path: Path) -> ProbeKey | None:
    """The key for `object_path` on this boot and kernel; None if it cannot be made."""
    import blake3

    try:
        boot_id = Path("/proc/sys/kernel/random/boot_id").read_text().strip()
        digest = blake3.blake3(object_path.read_bytes()).hexdigest()
    except OSError:
        return None
    return ProbeKey(boot_id=boot_id, kernel=os.uname().release, object_blake3=digest)


def probe_dir() -> Path:
    return STATE_DIR / PROBE_DIR_NAME


def answer_path(backend: str, key: ProbeKey) -> Path:
    """One file per backend and object: two builds of an object in use on one machine (two
    installs, a checkout beside the package, a benchmark against an older tree) would
    otherwise overwrite each other's answer and probe again at every run."""
    return probe_dir() / f"{backend}-{key.object_blake3[:16]}.json"


def root_only(st: os.stat_result) -> bool:
    """Owned by root and writable by no one else (a sticky directory still lets others
    replace their own entries, so it does not count)."""
    return st.st_uid == 0 and not st.st_mode & (stat.S_IWGRP | stat.S_IWOTH)


def path_is_root_only(path: Path) -> bool:
    """Every directory from / down to `path` (included) is root's alone."""
    path = Path(os.path.abspath(path))
    for part in [*reversed(path.parents), path]:
        try:
            st = os.lstat(part)
        except OSError:
            return False
        if stat.S_ISLNK(st.st_mode) or not root_only(st):
            return False
    return True


def recall(backend: str, key: ProbeKey) -> RememberedProbe | None:
    """The remembered probe of `backend` for `key`, or None (missing, stale, or not root's)."""
    where = probe_dir()
    if not path_is_root_only(where):
        return None
    try:
        fd = os.open(answer_path(backend, key), os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except OSError:
        return None
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode) or not root_only(st) or st.st_size > _MAX_BYTES:
            return None
        raw = json.loads(os.read(fd, _MAX_BYTES))
        found = RememberedProbe(ProbeKey(**raw["key"]), bool(raw["ok"]), str(raw["reason"]))
    except (OSError, ValueError, TypeError, KeyError):
        return None
    finally:
        os.close(fd)
    return found if found.key == key else None


def remember(backend: str, key: ProbeKey, ok: bool, reason: str) -> None:
    """Write (atomically) the probe of `backend`; best effort: a failure only costs a probe."""
    if os.geteuid() != 0:
        return
    where = probe_dir()
    try:
        where.mkdir(mode=0o755, parents=True, exist_ok=True)
        if not path_is_root_only(where):
            return
        tmp = where / f".{backend}.{os.getpid()}.tmp"
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW | os.O_CLOEXEC,
                     0o644)
        try:
            os.write(fd, json.dumps({"key": asdict(key), "ok": ok, "reason": reason}).encode())
        finally:
            os.close(fd)
        os.replace(tmp, answer_path(backend, key))
    except OSError:
        return


def forget_all() -> None:
    """Remove every remembered probe (tests; `trustdb backends` probes afresh anyway)."""
    for p in probe_dir().glob("*.json"):
        try:
            p.unlink()
        except OSError:
            continue
