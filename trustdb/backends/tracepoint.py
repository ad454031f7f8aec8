"""The `tracepoint` backend: for kernels that refuse BPF LSM (this one; Ubuntu by default).

Programs: bpf/tracepoint.bpf.c. Tracepoints cannot fail a syscall, so a denial is SIGKILL sent
before the task runs one instruction of the denied code (exec: at sched_process_exec; mmap and
mprotect: inside the syscall, right after the mapping was made, from mmap_lock_released).
"""

from __future__ import annotations

from trustdb.abi import BackendId
from trustdb.backends.bpfobject import BpfBackend
from trustdb.backends.interface import COMMON_HOLES


class TracepointBackend(BpfBackend):
    name = "tracepoint"
    strength = 10
    object_name = "tracepoint.bpf.o"
    backend_id = BackendId.TRACEPOINT
    probe_programs = ()
    guarantees = (
        "exec (execve, execveat, fexecve of memfd), every executable mapping of a new image (the "
        "ELF interpreter wherever it lies), and executable file mappings (mmap, mprotect adding "
        "PROT_EXEC) of untrusted content or of files with writers: the process is killed "
        "(SIGKILL) before its first instruction of that code; in `run`, code the process wrote "
        "itself (anonymous exec memory, W+X, an executable stack, SHM_EXEC) unless its program "
        "is flagged JIT, and shared-writable mappings of trusted files; confinement follows "
        "tasks across cgroup moves and namespaces; a confined task moving a task out of the "
        "scope or signalling the supervisor is killed."
    )
    holes = (
        "sigkill-not-eperm: a denial kills the process instead of failing the call, so a "
        "program that would fall back on EPERM (pcre2's JIT, a library probe) dies; `run` adds "
        "PR_SET_MDWE so that W+X mappings fail before the kernel programs see them; the "
        "denial line of a kill reaches the killed tool's own stderr through a copy the "
        "first-seen handler took at the library's open, except for code with no open the "
        "handler sees (a memfd): then its parent's stderr, if it is alive in the tree; a tree "
        "that stalls the handler's few writer threads (a splice holding its own stderr "
        "pipe's lock) silences its own later lines there: they still reach the supervisor's "
        "stderr and the log",
        "scripts-in-userspace: `#!` scripts and interpreters' script files are judged by "
        "fanotify permission events in the supervisor, not in the kernel (at sched_process_exec "
        "the kernel has already swapped a script for its interpreter)",
        "writes-in-userspace: opening trusted or mapped code for writing is refused by fanotify "
        "in the supervisor, not in the kernel (no tracepoint can fail an open)",
        "proc-mem-ptrace: forced writes over text through /proc/PID/mem or ptrace POKETEXT are "
        "not seen by any tracepoint; `run` makes /proc read-only and denies ptrace in seccomp",
        *COMMON_HOLES,
    )
