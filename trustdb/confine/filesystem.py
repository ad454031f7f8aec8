"""A policy's filesystem and network rules turned into what the confined child applies: the
mount plan (covers, private tmp, read-only binds) and, where the kernel has it, a Landlock
ruleset. Landlock is the allowlist (what is not granted does not exist for the tree); without it
the mount namespace gives the same rules less strictly (what is not granted is read-only), and
the run says which one is in force.
"""

from __future__ import annotations

import os
import site
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from trustdb.confine import landlock
from trustdb.confine.mounts import MountPlan
from trustdb.policy import NetworkMode, Policy, ResolvedFilesystem, resolve

PRIVATE_TMP = ("/tmp", "/var/tmp")
DEVICES = ("/dev",)
"""The tree's own minimal /dev (trustdb.confine.mounts): read-write, with ioctl (terminals)."""


def runtime_paths() -> list[str]:
    """Everything the supervisor itself loads: its interpreter, the stdlib, site-packages, the
    trustdb package, the entry-point script. Read-only inside the tree, so nothing the tree
    writes runs at the next unconfined `trustdb` start (issue 8, route 7)."""
    trustdb_root = Path(__file__).resolve().parents[2]
    paths = {sys.prefix, sys.exec_prefix, sys.base_prefix, os.path.realpath(sys.executable),
             str(trustdb_root)}
    paths.update(p for p in sys.path if p)
    if sys.argv and os.path.isfile(sys.argv[0]):
        paths.add(os.path.dirname(os.path.realpath(sys.argv[0])))
    user_site = site.getusersitepackages()
    if user_site:
        paths.add(user_site)
    out = {os.path.realpath(p) for p in paths if os.path.exists(p)}
    # /usr and the like are read-only through the policy already; bind only what is not.
    return sorted(p for p in out if p != "/")


@dataclass(frozen=True)
class FilesystemSetup:
    plan: MountPlan
    build: Callable[[], Callable[[], None]] | None
    """In the child after the mounts: builds the Landlock ruleset, returns its enforce step."""
    mechanism: str
    """One line for stderr and `trustdb status`: what confines the filesystem and network."""
    resolved: ResolvedFilesystem


def plan_for(policy: Policy, db: Path, workdir: str, extra_read_only: Sequence[str] = (),
             *, abi: int | None = None) -> FilesystemSetup:
    abi = landlock.abi_version() if abi is None else abi
    fs = resolve(policy.filesystem, workdir)
    runtime = runtime_paths()
    private = PRIVATE_TMP if fs.private_tmp else ()
    read_write = (*fs.read_write, *private)
    read_only = (*fs.read_only, *runtime, *extra_read_only)
    granted = (*read_write, *read_only)
    # Every no-access path is covered (grants below it are re-attached), with or without
    # Landlock: Landlock cannot carve a hole in a granted tree, and it does not cover connect(2)
    # to a pathname UNIX socket, which only a path that does not exist stops. A grant equal to
    # a no-access path wins.
    hidden = tuple(p for p in fs.no_access if p not in granted)
    plan = MountPlan.for_run(
        db, [*runtime, *extra_read_only, *fs.protected], hidden=hidden, private=private,
        keep=tuple(p for p in granted if p not in PRIVATE_TMP),
        read_write=read_write, everything_read_only=abi < 1, pinned=fs.pinned)
    net = policy.network
    if abi < 1:
        return FilesystemSetup(plan, None, "filesystem: mount namespace (no Landlock on this "
                               "kernel: paths outside the policy are read-only, not hidden); "
                               "network: not restricted", fs)
    rules = landlock.Rules(
        read_write=read_write,
        read_only=read_only,
        devices=DEVICES,
        restrict_network=net.mode != NetworkMode.ALL,
        connect_tcp=net.connect_tcp,
        bind_tcp=net.bind_tcp,
    )

    def build() -> Callable[[], None]:
        return landlock.Ruleset(rules, abi).enforce

    if net.mode == NetworkMode.ALL:
        network = "network: not restricted (policy)"
    elif abi < 4:
        network = f"network: not restricted (Landlock ABI {abi} has no TCP rules)"
    elif net.mode == NetworkMode.NONE:
        network = "network: no TCP connect or bind (Landlock)"
    else:
        network = (f"network: TCP connect to {_ports(net.connect_tcp)}, bind to "
                   f"{_ports(net.bind_tcp)} (Landlock; UDP is not restricted)")
    return FilesystemSetup(plan, build, f"filesystem: Landlock ABI {abi}; {network}", fs)


def _ports(ports: Sequence[int]) -> str:
    return ", ".join(map(str, ports)) if ports else "none"
