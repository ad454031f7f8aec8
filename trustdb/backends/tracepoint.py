"""The `tracepoint` backend: for kernels that refuse BPF LSM (this one; Ubuntu by default).

Programs: bpf/tracepoint.bpf.c. Tracepoints cannot fail a syscall, so a denial is SIGKILL sent
before the task runs one instruction of the denied code (exec: at sched_process_exec; mmap and
mprotect: inside the syscall, right after the mapping was made, from mmap_lock_released).
"""

from __future__ import annotations

from trustdb.abi import BackendId
from trustdb.backends.bpfobject import BpfBackend


class TracepointBackend(BpfBackend):
    name = "tracepoint"
    strength = 10
    object_name = "tracepoint.bpf.o"
    backend_id = BackendId.TRACEPOINT
    probe_programs = ()
    guarantees = (
        "exec (execve, execveat, fexecve of memfd), the ELF interpreter, and executable file "
        "mappings (mmap, mprotect adding PROT_EXEC) of untrusted content: the process is killed "
        "(SIGKILL) before its first instruction of that code; #! scripts are judged by their "
        "interpreter; confinement follows tasks across cgroup moves and namespaces; a confined "
        "task moving a task out of the scope or signalling the supervisor is killed."
    )
