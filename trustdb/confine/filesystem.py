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
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

from trustdb.confine import landlock, seccomp
from trustdb.confine.mounts import MountPlan
from trustdb.policy.model import NetworkMode, Policy
from trustdb.policy.paths import ResolvedFilesystem, resolve

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
        _make_absent_dir(user_site)  # absent, it could be made and filled inside the tree
        paths.add(user_site)
    out = {os.path.realpath(p) for p in paths if os.path.exists(p)}
    # /usr and the like are read-only through the policy already; bind only what is not.
    return sorted(p for p in out if p != "/")


def _make_absent_dir(path: str) -> None:
    """Create `path` (empty, owned like its nearest existing parent) so that it can be bound
    read-only: the user site dir (~/.local/lib/pythonX.Y/site-packages) that did not exist at
    start would otherwise be created by the tree, when the workdir is $HOME, with a .pth in it
    that runs at the next `trustdb` started without -I. An empty dir there changes nothing for
    Python."""
    missing = []
    p = os.path.abspath(path)
    while not os.path.lexists(p) and p != "/":
        missing.append(p)
        p = os.path.dirname(p)
    if not missing or not os.path.isdir(p):
        return
    st = os.stat(p)
    for d in reversed(missing):
        try:
            os.mkdir(d, 0o755)
            os.chown(d, st.st_uid, st.st_gid)
        except OSError:
            return


@dataclass(frozen=True)
class FilesystemSetup:
    plan: MountPlan
    build: Callable[[], Callable[[], None]] | None
    """In the child after the mounts: builds the Landlock ruleset, returns its enforce step."""
    mechanism: str
    """One line for stderr and `trustdb status`: what confines the filesystem and network."""
    resolved: ResolvedFilesystem
    ip_sockets: tuple[tuple[int, int], ...] | None = None
    """The only IP socket kinds the tree may create (seccomp); None: any."""


def dns_relay_wanted(policy: Policy) -> bool:
    """Whether the tree needs the supervisor's DNS relay (trustdb.dns_relay): it may reach TCP
    port 53 but no UDP."""
    net = policy.network
    return net.mode == NetworkMode.PORTS and not net.udp and 53 in net.connect_tcp


# Mounted for the tree on their own (the new proc, /sys read-only) before the plan's binds.
_MOUNTED_APART = ("/proc", "/sys")


def read_only_mounts(read_only: Sequence[str], writable: Sequence[str]) -> tuple[str, ...]:
    """The policy's read-only paths that become read-only bind mounts as well, with Landlock or
    without: Landlock has no right for chmod, chown, utime or setxattr, so only a read-only mount
    stops the confined root from setting a setuid bit or a file capability on a host binary, or
    moving a trusted file's ctime. A path that holds a writable grant (a workdir under /opt)
    stays Landlock's alone, or the grant below it would turn read-only too."""
    def holds_grant(p: str) -> bool:
        return any(w == p or w.startswith(p.rstrip("/") + "/") for w in writable)
    # /bin -> usr/bin on merged-/usr systems: the target, once.
    real = dict.fromkeys(os.path.realpath(p) for p in read_only if p.startswith("/"))
    return tuple(p for p in real if p not in _MOUNTED_APART and not holds_grant(p))


def plan_for(policy: Policy, db: Path, workdir: str, extra_read_only: Sequence[str] = (),
             *, abi: int | None = None, resolv_conf: str = "") -> FilesystemSetup:
    """`resolv_conf`: the file to show at /etc/resolv.conf (the DNS relay's)."""
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
    net = policy.network
    ip_sockets = None if net.mode == NetworkMode.ALL else (
        seccomp.TCP_AND_UDP if net.udp else seccomp.TCP_ONLY)
    plan = MountPlan.for_run(
        db, [*read_only_mounts(fs.read_only, (*read_write, *private)), *runtime,
             *extra_read_only, *fs.protected], hidden=hidden, private=private,
        keep=tuple(p for p in granted if p not in PRIVATE_TMP),
        read_write=read_write, everything_read_only=abi < 1, pinned=fs.pinned,
        unlisted=unlisted_paths((*granted, *DEVICES, "/etc/trustdb"), private),
        resolv_conf=resolv_conf)
    sockets = _ip_sockets_line(ip_sockets)
    if abi < 1:
        return FilesystemSetup(plan, None, "filesystem: mount namespace (no Landlock on this "
                               "kernel: paths the policy lists nothing of are hidden, the rest "
                               f"outside it is read-only); network: TCP not restricted{sockets}",
                               fs, ip_sockets)
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
        network = f"network: TCP not restricted (Landlock ABI {abi} has no TCP rules)"
    elif net.mode == NetworkMode.NONE:
        network = "network: no TCP connect or bind (Landlock)"
    else:
        network = (f"network: TCP connect to {_ports(net.connect_tcp)}, bind to "
                   f"{_ports(net.bind_tcp)} (Landlock)")
    return FilesystemSetup(plan, build, f"filesystem: Landlock ABI {abi}; {network}{sockets}",
                           fs, ip_sockets)


def _ip_sockets_line(ip_sockets: tuple[tuple[int, int], ...] | None) -> str:
    if ip_sockets is None:
        return ""
    if ip_sockets == seccomp.TCP_ONLY:
        return "; UDP and other non-TCP IP sockets refused (seccomp)"
    return "; UDP allowed, other non-TCP IP sockets refused (seccomp)"


def _ports(ports: Sequence[int]) -> str:
    return ", ".join(map(str, ports)) if ports else "none"


MAX_COVERS_PER_DIR = 256


def unlisted_paths(granted: Sequence[str], private: Sequence[str] = ()) -> tuple[str, ...]:
    """The entries beside every granted path's ancestors that nothing is granted in: with
    grants /usr and /home/u/proj, that is /srv, /var, /mnt..., and /home/u's other entries.
    Covering them makes what the policy does not list unreachable by any path walk (Landlock
    only refuses opens). A directory with very many such entries is listed itself instead (its
    granted paths are re-attached below its cover)."""
    grants = {os.path.normpath(p) for p in granted if p.startswith("/")}
    ancestors: set[str] = set()
    for g in grants:
        p = g
        while p != "/":
            p = os.path.dirname(p)
            ancestors.add(p)
    def under(path: str, tops: Iterable[str]) -> bool:
        return any(path == t or path.startswith(t.rstrip("/") + "/") for t in tops)

    out: list[str] = []
    for d in sorted(ancestors):
        if under(d, grants) or under(d, private):
            continue  # granted (wholly, with what is below): nothing to cover in it
        try:
            names = sorted(os.listdir(d))
        except OSError:
            continue
        entries = [os.path.join(d, n) for n in names]
        entries = [e for e in entries if e not in grants and e not in ancestors]
        if len(entries) > MAX_COVERS_PER_DIR and d != "/":
            out.append(d)
        else:
            out.extend(entries)
    return tuple(out)
