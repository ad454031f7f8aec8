"""The confined tree of `trustdb run`: its cgroup, its namespaces, and how its first process starts.

A run owns one cgroup v2 directory, `trustdb-run-<id>`, from creation to removal. Its first
process (the "init" of a new PID namespace) is forked by the supervisor and then, in order:

1. asks the kernel for SIGKILL when the supervisor dies (PR_SET_PDEATHSIG); being the init of
   its PID namespace, its death kills every process of the namespace: if the supervisor dies for
   any reason, the whole confined tree dies with it (never fail open);
2. enters the run cgroup;
3. makes a private mount namespace in which the trust DB and /sys/fs/bpf are covered by empty
   read-only tmpfs, /proc shows only the new PID namespace (the supervisor is invisible: it cannot
   be signalled, traced or stopped by pid), /sys and a few kernel-helper configs are read-only,
   and /dev holds only harmless character devices (no block device to write the DB through);
4. says "ready" and blocks on a pipe while the supervisor marks it confined through its pidfd
   (`Backend.confine`): from then on it and every descendant are judged by the BPF programs;
5. on "go", takes a session of its own (with the relayed pty as its terminal when the user has
   one: trustdb.confine.pty), drops CAP_SYS_TIME, turns on W^X unless the policy allows a JIT
   (trustdb.confine.hardening), installs the seccomp filter (trustdb.confine.seccomp: no bpf(),
   mount, ptrace, module loading, namespaces, clock, chroot, io_uring, TIOCSTI ...), and exec's
   CMD. CMD is the first thing checked against the trust
   database, so CMD itself must be trusted.

A watcher process, forked before any BPF object exists (so it holds none), removes the cgroup
after the supervisor is gone, even if the supervisor was killed with SIGKILL.
"""


from trustdb.confine.cgroup import (
    CGROUP_PREFIX,
    RunCgroup,
    cgroup2_root,
    stale_cgroups,
    start_watcher,
)
from trustdb.confine.child import ConfinedChild, ExecSetup, resolve_command, spawn
from trustdb.confine.mounts import MountPlan
from trustdb.confine.syscalls import ConfineError

__all__ = [
    "CGROUP_PREFIX",
    "ConfineError",
    "ConfinedChild",
    "ExecSetup",
    "MountPlan",
    "RunCgroup",
    "cgroup2_root",
    "resolve_command",
    "spawn",
    "stale_cgroups",
    "start_watcher",
]
