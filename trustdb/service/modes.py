"""The service's per-uid and per-cgroup modes: the policy's [service.uids] and
[service.cgroups] into the kernel's `mode_uids` and `mode_cgroups` maps (bpf/modes.bpf.h).

The kernel decides per task, on the deny path only: the deepest listed ancestor of the task's
cgroup wins (the longest path prefix), then its uid (audit by uid also needs the effective uid
in audit: a setuid-root program run by an audit user is judged as root), then the service's
default. A `run` tree is decided by its own engine and never by these rules.

cgroup paths become cgroup ids here (a cgroup v2 id is its directory's inode number), again
on SIGHUP and on every periodic check, so a listed cgroup that appears later (a service
started after the daemon) gets its rule within one check (trustdb.daemon.FALLBACK_CHECK_S);
until then its tasks have their parent's mode.

An audit rule is a way out of enforcement for whoever can put a task into it, so an audit
rule is applied only to a cgroup that root alone can move tasks into: the directory, each
parent up to the cgroup root and its `cgroup.procs` owned by root and not writable by group
or others. A delegated cgroup (systemd `Delegate=`, a user's own `user@UID.service` tree) is
refused with a reason (`trustdb service status`). Root itself can still move a task into an
audit cgroup or change a task's uid to an audit uid: every such move is logged by the kernel
(reason `tamper_mode_move`), and named as a gap in `trustdb backends` and the README.
"""

from __future__ import annotations

import os
import stat
import struct
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

from trustdb.abi import Mode
from trustdb.events import decision
from trustdb.libbpf import BpfMap
from trustdb.policy.model import Enforcement, ServiceRules

MODE_DEPTH = 32
"""cgroup levels the kernel searches (TD_MODE_DEPTH in bpf/modes.bpf.h)."""
MAP_NAMES = ("mode_uids", "mode_cgroups")

_MODE = {Enforcement.ENFORCE: Mode.ENFORCE, Enforcement.AUDIT: Mode.AUDIT}


@dataclass(frozen=True)
class ResolvedModes:
    """The rules as the kernel gets them, and what could not be given to it, with why."""

    default: Mode
    uids: Mapping[int, Mode] = field(default_factory=dict)
    cgroups: Mapping[int, tuple[str, Mode]] = field(default_factory=dict)
    """cgroup id -> (path as listed, mode)."""
    missing: tuple[str, ...] = ()
    """Listed cgroups that do not exist (yet): resolved when they appear."""
    refused: tuple[tuple[str, str], ...] = ()
    """(path, why) of rules that are not applied."""

    def lines(self) -> list[str]:
        """What is in force, for `trustdb service status` and `policy show`."""
        out = [f"default: {self.default.name.lower()}"]
        out += [f"uid {u}: {m.name.lower()}" for u, m in sorted(self.uids.items())]
        out += [f"cgroup {p}: {m.name.lower()} (id {i})"
                for i, (p, m) in sorted(self.cgroups.items(), key=lambda kv: kv[1][0])]
        out += [f"cgroup {p}: not applied: does not exist (yet)" for p in self.missing]
        out += [f"cgroup {p}: not applied: {why}" for p, why in self.refused]
        return out

    def to_dict(self) -> dict[str, object]:
        return {"default": self.default.name.lower(),
                "uids": {str(u): m.name.lower() for u, m in self.uids.items()},
                "cgroups": {p: {"mode": m.name.lower(), "id": i}
                            for i, (p, m) in self.cgroups.items()},
                "missing": list(self.missing),
                "refused": {p: why for p, why in self.refused}}


def _root_only(path: Path, root: Path) -> str:
    """'' if only root can move tasks into cgroup `path`, else why not."""
    for d in (path, *path.parents):
        st = os.stat(d)
        if st.st_uid != 0 or st.st_mode & (stat.S_IWGRP | stat.S_IWOTH):
            return f"{d} is writable by uid {st.st_uid} or its group (a delegated cgroup)"
        if d == root:
            break
    procs = os.stat(path / "cgroup.procs")
    if procs.st_uid != 0 or procs.st_mode & (stat.S_IWGRP | stat.S_IWOTH):
        return (f"{path}/cgroup.procs is writable by uid {procs.st_uid} or its group (a "
                "delegated cgroup: its owner could move its processes in)")
    return ""


def resolve(rules: ServiceRules, default: Mode, root: Path | None = None) -> ResolvedModes:
    """The policy's rules against the cgroups that exist now under `root` (cgroup2's mount)."""
    if root is None:
        from trustdb.confine.cgroup import cgroup2_root

        root = cgroup2_root()
    cgroups: dict[int, tuple[str, Mode]] = {}
    missing: list[str] = []
    refused: list[tuple[str, str]] = []
    for listed, enforcement in rules.per_cgroup.items():
        mode = _MODE[enforcement]
        parts = [p for p in listed.split("/") if p]
        if ".." in parts or "." in parts:
            refused.append((listed, "not a plain cgroup path"))
            continue
        if len(parts) >= MODE_DEPTH:
            refused.append((listed, f"deeper than {MODE_DEPTH - 1} levels"))
            continue
        path = root.joinpath(*parts)
        try:
            st = os.stat(path)
            why = _root_only(path, root) if mode == Mode.AUDIT else ""
        except FileNotFoundError:
            missing.append(listed)
            continue
        except OSError as e:
            refused.append((listed, e.strerror or str(e)))
            continue
        if not stat.S_ISDIR(st.st_mode) or not (path / "cgroup.procs").exists():
            refused.append((listed, f"{path} is not a cgroup"))
        elif why:
            refused.append((listed, why))
        else:
            cgroups[st.st_ino] = (listed, mode)
    uids = {int(u): _MODE[m] for u, m in rules.per_uid.items()}
    return ResolvedModes(default, uids, cgroups, tuple(missing), tuple(refused))


class ModeMaps:
    """The two kernel maps, kept equal to the last ResolvedModes (only changes are written)."""

    def __init__(self, uids: BpfMap, cgroups: BpfMap) -> None:
        self.uids = uids
        self.cgroups = cgroups
        self.current: ResolvedModes | None = None

    def apply(self, resolved: ResolvedModes) -> bool:
        """Write `resolved` into the kernel. True when a map changed."""
        changed = _sync(self.uids, "<I", {k: int(m) for k, m in resolved.uids.items()})
        changed |= _sync(self.cgroups, "<Q",
                         {k: int(m) for k, (_, m) in resolved.cgroups.items()})
        decision.CGROUP_NAMES.clear()
        decision.CGROUP_NAMES.update({i: p for i, (p, _) in resolved.cgroups.items()})
        self.current = resolved
        return changed


def _sync(m: BpfMap, key_format: str, want: Mapping[int, int]) -> bool:
    """Make map `m` hold exactly `want`: new and changed entries first, then the removed ones
    (a rule in the middle of a change is never missing and present at once)."""
    have = {struct.unpack(key_format, k)[0]: m.lookup(k) for k in m.keys()}
    changed = False
    for key, mode in want.items():
        value = bytes([mode])
        if have.get(key) != value:
            m.update(struct.pack(key_format, key), value)
            changed = True
    for key in set(have) - set(want):
        m.delete(struct.pack(key_format, key))
        changed = True
    return changed


class TaskModes:
    """The kernel's choice (td_mode_of) made again in userspace from the same maps, for the
    first-seen handler (a fanotify answer to an exec before the BPF side sees it): is `pid`
    enforced? Anything unreadable (the task is gone, /proc hidden) counts as enforced."""

    def __init__(self, uids: BpfMap, cgroups: BpfMap, default: Mode,
                 root: Path | None = None) -> None:
        # Everything is imported and found now, in the parent: the handler it runs in must
        # open no file of a marked filesystem (it would wait for its own answer).
        if root is None:
            from trustdb.confine.cgroup import cgroup2_root

            root = cgroup2_root()
        self._uids = uids
        self._cgroups = cgroups
        self._default = default
        self._root = root

    def _lookup_uid(self, uid: int) -> Mode | None:
        v = self._uids.lookup(struct.pack("<I", uid))
        return Mode(v[0]) if v else None

    def mode_of(self, pid: int) -> Mode:
        try:
            uid, euid = _uids_of(pid)
            cgroup = _cgroup_of(pid)
        except (OSError, ValueError):
            return Mode.ENFORCE
        parts = [p for p in cgroup.split("/") if p][:MODE_DEPTH - 1]
        for depth in range(len(parts), -1, -1):  # the deepest listed ancestor wins
            try:
                ino = os.stat(self._root.joinpath(*parts[:depth])).st_ino
            except OSError:
                return Mode.ENFORCE
            v = self._cgroups.lookup(struct.pack("<Q", ino))
            if v:
                return Mode(v[0])
        mode = self._lookup_uid(uid)
        if mode is None:
            return self._default
        if mode == Mode.AUDIT and euid != uid:
            effective = self._lookup_uid(euid)  # ENFORCE is 0: test None, as the kernel does
            if (self._default if effective is None else effective) != Mode.AUDIT:
                return Mode.ENFORCE
        return mode

    def enforce_for(self, pid: int) -> bool:
        try:
            return self.mode_of(pid) == Mode.ENFORCE
        except Exception:  # noqa: BLE001 - a map read failed: fail closed
            return True


def _uids_of(pid: int) -> tuple[int, int]:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("Uid:"):
                real, effective = line.split()[1:3]
                return int(real), int(effective)
    raise ValueError(f"/proc/{pid}/status has no Uid line")


def _cgroup_of(pid: int) -> str:
    with open(f"/proc/{pid}/cgroup") as f:
        for line in f:
            if line.startswith("0::"):
                return line[3:].strip()
    raise ValueError(f"/proc/{pid}/cgroup has no cgroup v2 line")
