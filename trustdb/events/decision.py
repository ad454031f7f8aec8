"""The value of the events stage: one `struct td_event` from the ring buffer becomes one frozen
`Decision` (wall-clock time, names instead of numbers, a named reason constant)."""

from __future__ import annotations

import ctypes
import datetime as dt
import json
import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, TypeVar

from trustdb.abi import BackendId, CEvent, Hook, Mode, ModeRule, Reason, Verdict

# --- reasons (Santa's kAllowBinary / kBlockUnknown, as strings that land in the log) -----------

REASON_TRUSTED = "trusted"
"""Allowed: the file's inode key is in the trusted map."""
REASON_UNTRUSTED_EXEC = "untrusted_exec"
"""An exec (execve, execveat, fexecve of a memfd) of content the database does not trust."""
REASON_UNTRUSTED_MMAP = "untrusted_mmap"
"""An executable file mapping (shared library, `ld.so ./binary`, dlopen, LD_PRELOAD)."""
REASON_MPROTECT_EXEC = "mprotect_exec"
"""mprotect adding PROT_EXEC to a mapping of untrusted content."""
REASON_UNVERIFIABLE = "unverifiable"
"""A new executable mapping could not be inspected; denied, failing closed."""
REASON_WRITABLE = "writable"
"""Code with writers (an fd open for writing, a shared-writable mapping), or a write to trusted
or executable-mapped code (hook `write`)."""
REASON_ANON_EXEC = "anon_exec"
"""Code the process wrote itself (anonymous executable memory, W+X, an executable stack,
SHM_EXEC) by a program not allowed as a JIT."""
REASON_UNTRUSTED_SCRIPT = "untrusted_script"
"""An interpreter opened a script file whose content is not trusted (lsm)."""
REASON_PROC_MEM = "proc_mem"
"""A confined task opened /proc/PID/mem for writing (lsm)."""
REASON_TAMPER_CGROUP_ESCAPE = "tamper_cgroup_escape"
"""A confined task tried to move a task out of the confinement cgroup."""
REASON_TAMPER_SIGNAL_SUPERVISOR = "tamper_signal_supervisor"
"""A confined task tried to signal (kill, stop) the supervising trustdb process."""
REASON_TAMPER_BPF = "tamper_bpf"
"""A confined task called bpf() (detach programs, edit maps)."""
REASON_TAMPER_PTRACE = "tamper_ptrace"
"""A confined task tried to ptrace an unconfined one."""
REASON_TAMPER_DB_WRITE = "tamper_db_write"
"""A confined task wrote, moved or mounted over the trust database."""
REASON_TAMPER_RAW_DEVICE = "tamper_raw_device"
"""A confined task opened a block device for writing."""
REASON_TAMPER_SYSCTL = "tamper_sysctl"
"""A confined task opened /proc/sys for writing."""
REASON_TAMPER_MODE_MOVE = "tamper_mode_move"
"""Service: a task was moved into a cgroup whose rule is audit (logged, never denied)."""
REASON_TAMPER_KERNEL_LOAD = "tamper_kernel_load"
"""A confined task loaded a kernel module, kexec image or policy."""

_UNTRUSTED_BY_HOOK = {
    Hook.EXEC: REASON_UNTRUSTED_EXEC,
    Hook.MMAP: REASON_UNTRUSTED_MMAP,
    Hook.MPROTECT: REASON_MPROTECT_EXEC,
}


def reason_name(hook: Hook, code: int) -> str:
    """The named reason for a C `enum td_reason` code (abi.Reason) seen at `hook`: untrusted
    content is named by hook, a tamper attempt by what was tried. A code this version does not
    know (a newer BPF object) becomes `unknown_N` rather than an error."""
    try:
        reason = Reason(code)
    except ValueError:
        return f"unknown_{code}"
    if reason == Reason.TRUSTED:
        return REASON_TRUSTED
    if reason == Reason.UNTRUSTED:
        return _UNTRUSTED_BY_HOOK.get(hook, "untrusted")
    name = reason.name.lower()
    return f"tamper_{name}" if hook == Hook.TAMPER else name


BACKEND_NAMES = {BackendId.TRACEPOINT: "tracepoint", BackendId.LSM: "lsm"}

CGROUP_NAMES: dict[int, str] = {}
"""cgroup v2 id -> path of the cgroups the service's mode rules name (trustdb.service.modes
fills it each time it resolves them), so that a decision names the rule by path."""


def mode_rule_name(event: CEvent) -> str:
    """Why the event's mode is in force: '' (the default), `uid N` or `cgroup PATH`."""
    if event.mode_rule == ModeRule.UID:
        return f"uid {event.uid}"
    if event.mode_rule == ModeRule.CGROUP:
        return "cgroup " + CGROUP_NAMES.get(event.mode_cgroup, f"id {event.mode_cgroup}")
    return ""


# --- the value ------------------------------------------------------------------------------


def boot_ns_to_datetime(boot_ns: int) -> dt.datetime:
    """Wall-clock UTC time of a `bpf_ktime_get_boot_ns()` stamp (CLOCK_BOOTTIME counts suspend
    too, so its offset to the real-time clock only moves when the wall clock is set)."""
    offset = time.time_ns() - time.clock_gettime_ns(time.CLOCK_BOOTTIME)
    wall = boot_ns + offset
    seconds = dt.datetime.fromtimestamp(wall // 1_000_000_000, tz=dt.UTC)
    return seconds + dt.timedelta(microseconds=(wall % 1_000_000_000) // 1000)


def proc_exe(tgid: int) -> str:
    """/proc/TGID/exe, or '' if the process is gone or hidden from us."""
    try:
        return os.readlink(f"/proc/{tgid}/exe")
    except OSError:
        return ""


def _c_string(raw: bytes) -> str:
    # Paths are bytes on Linux: surrogateescape keeps non-UTF-8 names lossless through JSON.
    return raw.split(b"\0", 1)[0].decode("utf-8", "surrogateescape")


def _dev_str(kdev: int) -> str:
    return f"{kdev >> 20}:{kdev & 0xFFFFF}"


def _dev_from_str(text: str) -> int:
    major, minor = text.split(":")
    return (int(major) << 20) | int(minor)


@dataclass(frozen=True, slots=True)
class Decision:
    """One decision a BPF program took, in the terms a person reads."""

    time: dt.datetime
    """When the hook ran (UTC, microseconds)."""
    pid: int
    """Thread id (kernel pid)."""
    tgid: int
    """Process id."""
    ppid: int
    uid: int
    comm: str
    """Task name at the time of the decision (after exec: the new program's name)."""
    path: str
    """The file decided on: full path where the hook can give it, else its name; '' if none
    (tamper events)."""
    dev: int
    """Device of the file, kernel encoding (major << 20 | minor); 0 when there is no file."""
    ino: int
    hook: Hook
    verdict: Verdict
    mode: Mode
    backend: str
    """`tracepoint` or `lsm`: the backend that decided."""
    reason: str
    """One of the REASON_* constants (or `unknown_N` from a newer BPF object)."""
    exe: str = ""
    """The process's executable: for an exec, the file itself; otherwise /proc/TGID/exe read
    when the event arrived ('' if the process was already gone, e.g. killed)."""
    mode_rule: str = ""
    """The service rule that set `mode` (`uid 1001`, `cgroup /system.slice/x.service`); ''
    for the default mode (and always in `run`)."""

    @property
    def denied(self) -> bool:
        """Denied, or would have been in audit mode."""
        return self.verdict != Verdict.ALLOW

    @classmethod
    def from_event(
        cls,
        event: CEvent,
        backend_name: str | None = None,
        *,
        exe_of: Callable[[int], str] | None = None,
    ) -> Decision:
        """Convert one ring buffer record. `backend_name` overrides the event's backend id;
        `exe_of(tgid)` finds the executable of a non-exec event (default: /proc/TGID/exe)."""
        hook = Hook(event.hook)
        path = _c_string(event.path)
        exe = path if hook == Hook.EXEC else (exe_of or proc_exe)(event.tgid)
        if backend_name is None:
            backend_name = BACKEND_NAMES.get(BackendId(event.backend), str(event.backend))
        return cls(
            time=boot_ns_to_datetime(event.time_ns),
            pid=event.pid,
            tgid=event.tgid,
            ppid=event.ppid,
            uid=event.uid,
            comm=_c_string(event.comm),
            path=path,
            dev=event.file.dev,
            ino=event.file.ino,
            hook=hook,
            verdict=Verdict(event.verdict),
            mode=Mode(event.mode),
            backend=backend_name,
            reason=reason_name(hook, event.reason),
            exe=exe,
            mode_rule=mode_rule_name(event),
        )

    def to_dict(self) -> dict[str, Any]:
        return {
            "time": self.time.isoformat(timespec="microseconds").replace("+00:00", "Z"),
            "verdict": _enum_name(self.verdict),
            "hook": _enum_name(self.hook),
            "reason": self.reason,
            "path": self.path,
            "dev": _dev_str(self.dev),
            "ino": self.ino,
            "pid": self.pid,
            "tgid": self.tgid,
            "ppid": self.ppid,
            "uid": self.uid,
            "comm": self.comm,
            "exe": self.exe,
            "mode": _enum_name(self.mode),
            "backend": self.backend,
            **({"mode_rule": self.mode_rule} if self.mode_rule else {}),
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Decision:
        """Inverse of `to_dict`. Raises ValueError (or KeyError/TypeError) on a bad record."""
        return cls(
            time=dt.datetime.fromisoformat(d["time"]),
            pid=int(d["pid"]),
            tgid=int(d["tgid"]),
            ppid=int(d["ppid"]),
            uid=int(d["uid"]),
            comm=str(d["comm"]),
            path=str(d["path"]),
            dev=_dev_from_str(d["dev"]),
            ino=int(d["ino"]),
            hook=_enum_value(Hook, d["hook"]),
            verdict=_enum_value(Verdict, d["verdict"]),
            mode=_enum_value(Mode, d["mode"]),
            backend=str(d["backend"]),
            reason=str(d["reason"]),
            exe=str(d.get("exe", "")),
            mode_rule=str(d.get("mode_rule", "")),
        )


_E = TypeVar("_E", Hook, Verdict, Mode)


def _enum_name(value: Hook | Verdict | Mode) -> str:
    return value.name.lower().replace("_", "-")


def _enum_value(kind: type[_E], name: str) -> _E:
    try:
        return kind[name.upper().replace("-", "_")]
    except KeyError:
        raise ValueError(f"unknown {kind.__name__.lower()} {name!r}") from None


def parse_json_line(line: str | bytes) -> Decision:
    """One line of the JSON-lines log -> Decision. Raises ValueError on anything else."""
    try:
        record = json.loads(line)
        if not isinstance(record, dict):
            raise TypeError("not a JSON object")
        return Decision.from_dict(record)
    except (KeyError, TypeError) as e:
        raise ValueError(f"not a decision record ({e.__class__.__name__}: {e})") from None



# --- from the ring buffer --------------------------------------------------------------------

EVENT_SIZE = ctypes.sizeof(CEvent)


def decode_event(data: bytes) -> CEvent:
    """One ring buffer sample -> CEvent. Raises ValueError if it is shorter than the struct."""
    if len(data) < EVENT_SIZE:
        raise ValueError(f"short event: {len(data)} bytes, want {EVENT_SIZE}")
    return CEvent.from_buffer_copy(data[:EVENT_SIZE])

