"""Decision events: ring buffer record -> `Decision` -> log (the last pipeline stage).

The BPF programs decide; this module only says what they decided. One `struct td_event` from the
ring buffer becomes one frozen `Decision` (wall-clock time, names instead of numbers, a named
reason). A `Logger` pairs one serializer (JSON lines, text) with one writer (file, syslog/journal,
null), as Santa's Logger does: the JSON-lines file is the record, `trustdb log` reads it back.
"""

from __future__ import annotations

import ctypes
import datetime as dt
import json
import os
import socket
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol, Self, TypeVar

from trustdb.abi import BackendId, CEvent, Hook, Mode, Reason, Verdict

DEFAULT_LOG = Path("/var/log/trustdb/decisions.jsonl")
LOG_ENV = "TRUSTDB_LOG"

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


# --- serializers: Decision -> bytes ------------------------------------------------------------


class Serializer(Protocol):
    def serialize(self, decision: Decision) -> bytes:
        """One record, newline-terminated."""
        ...


class JsonLinesSerializer:
    """One compact JSON object per line (ASCII: non-UTF-8 path bytes survive as escapes)."""

    def serialize(self, decision: Decision) -> bytes:
        return json.dumps(decision.to_dict(), separators=(",", ":")).encode() + b"\n"


class TextSerializer:
    """One line a person reads: `TIME VERDICT HOOK PATH by COMM[PID] uid=... (reason) ...`."""

    def serialize(self, decision: Decision) -> bytes:
        return render_text(decision).encode("utf-8", "backslashreplace") + b"\n"


_VERDICT_WORD = {Verdict.ALLOW: "ALLOW", Verdict.DENY: "DENY", Verdict.AUDIT_DENY: "WOULD-DENY"}


def render_text(d: Decision) -> str:
    when = d.time.astimezone(dt.UTC).strftime("%Y-%m-%d %H:%M:%S.%f")[:-3] + "Z"
    what = d.path or "-"
    exe = f" exe={d.exe}" if d.exe and d.exe != d.path else ""
    return (
        f"{when} {_VERDICT_WORD[d.verdict]} {_enum_name(d.hook)} {what}"
        f" by {d.comm}[{d.tgid}]{exe} uid={d.uid} ppid={d.ppid} ({d.reason})"
        f" dev={_dev_str(d.dev)} ino={d.ino} {_enum_name(d.mode)}/{d.backend}"
    )


# --- writers: bytes -> somewhere -------------------------------------------------------------


class Writer(Protocol):
    def write(self, record: bytes) -> None: ...

    def close(self) -> None: ...


def default_log_path() -> Path:
    return Path(os.environ.get(LOG_ENV) or DEFAULT_LOG)


class FileWriter:
    """Appends records to a file, one write(2) each (O_APPEND: concurrent writers never
    interleave within a record). Reopens the path if it was rotated away."""

    def __init__(self, path: Path | None = None) -> None:
        self.path = path or default_log_path()
        self.path.parent.mkdir(mode=0o750, parents=True, exist_ok=True)
        self._fd = self._open()

    def _open(self) -> int:
        flags = os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC
        return os.open(self.path, flags, 0o640)

    def _rotated(self) -> bool:
        try:
            st = os.stat(self.path)
        except FileNotFoundError:
            return True
        mine = os.fstat(self._fd)
        return (st.st_dev, st.st_ino) != (mine.st_dev, mine.st_ino)

    def write(self, record: bytes) -> None:
        if self._rotated():
            os.close(self._fd)
            self._fd = self._open()
        os.write(self._fd, record)

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1


class SyslogWriter:
    """Sends each record to the journal (python-systemd, if installed) or to the /dev/log
    datagram socket as an RFC 3164 message (facility authpriv, severity notice)."""

    PRIORITY = (10 << 3) | 5  # LOG_AUTHPRIV | LOG_NOTICE

    def __init__(self, address: str = "/dev/log", ident: str = "trustdb") -> None:
        self._ident = ident
        self._journal: Callable[..., None] | None = None
        self._sock: socket.socket | None = None
        try:
            from systemd import journal  # type: ignore[import-not-found]

            self._journal = journal.send
        except ImportError:
            self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
            self._address = address

    def write(self, record: bytes) -> None:
        text = record.rstrip(b"\n").decode("utf-8", "replace")
        if self._journal is not None:
            self._journal(text, SYSLOG_IDENTIFIER=self._ident, PRIORITY=5)
            return
        assert self._sock is not None
        message = f"<{self.PRIORITY}>{self._ident}[{os.getpid()}]: {text}"
        try:
            self._sock.sendto(message.encode(), self._address)
        except OSError:
            pass  # no syslog daemon: the file log is the record, syslog is a courtesy copy

    def close(self) -> None:
        if self._sock is not None:
            self._sock.close()


class NullWriter:
    def write(self, record: bytes) -> None:
        pass

    def close(self) -> None:
        pass


# --- the logger: one serializer + one writer -------------------------------------------------

SERIALIZERS: dict[str, Callable[[], Serializer]] = {
    "json": JsonLinesSerializer,
    "text": TextSerializer,
}


class Logger:
    """Pairs one serializer with one writer (Santa's Logger)."""

    def __init__(self, serializer: Serializer, writer: Writer) -> None:
        self.serializer = serializer
        self.writer = writer

    @classmethod
    def create(
        cls, destination: str = "file", *, fmt: str | None = None, path: Path | None = None
    ) -> Logger:
        """The one switch: `file` (JSON lines by default, at `path` or $TRUSTDB_LOG or
        /var/log/trustdb/decisions.jsonl), `syslog` (text by default), or `null`."""
        writer: Writer
        if destination == "file":
            writer, default_fmt = FileWriter(path), "json"
        elif destination == "syslog":
            writer, default_fmt = SyslogWriter(), "text"
        elif destination == "null":
            writer, default_fmt = NullWriter(), "json"
        else:
            raise ValueError(f"unknown log destination {destination!r} (file, syslog, null)")
        fmt = fmt or default_fmt
        if fmt not in SERIALIZERS:
            raise ValueError(f"unknown log format {fmt!r} (json, text)")
        return cls(SERIALIZERS[fmt](), writer)

    def log(self, decision: Decision) -> None:
        self.writer.write(self.serializer.serialize(decision))

    def close(self) -> None:
        self.writer.close()


# --- from the ring buffer --------------------------------------------------------------------

EVENT_SIZE = ctypes.sizeof(CEvent)


def decode_event(data: bytes) -> CEvent:
    """One ring buffer sample -> CEvent. Raises ValueError if it is shorter than the struct."""
    if len(data) < EVENT_SIZE:
        raise ValueError(f"short event: {len(data)} bytes, want {EVENT_SIZE}")
    return CEvent.from_buffer_copy(data[:EVENT_SIZE])


class EventSink:
    """Turns raw ring buffer samples into Decisions and hands each to every consumer (the
    logger, the `trustdb run` stderr reporter...). A consumer that raises does not stop the
    others: losing a log line must not lose the next decision."""

    def __init__(self, backend_name: str, *consumers: Callable[[Decision], None]) -> None:
        self.backend_name = backend_name
        self.consumers = list(consumers)
        self.dropped = 0
        """Samples that could not be decoded (a mismatched BPF object)."""
        self.failures = 0
        """Consumer calls that raised (e.g. the log's disk is full)."""
        self.errors: deque[str] = deque(maxlen=100)
        """The latest decode and consumer errors (bounded: a daemon runs for months)."""

    def on_sample(self, data: bytes) -> Decision | None:
        try:
            decision = Decision.from_event(decode_event(data), self.backend_name)
        except ValueError as e:
            self.dropped += 1
            self.errors.append(str(e))
            return None
        for consume in self.consumers:
            try:
                consume(decision)
            except Exception as e:  # noqa: BLE001 - keep delivering to the other consumers
                self.failures += 1
                self.errors.append(f"{getattr(consume, '__qualname__', consume)}: {e}")
        return decision


class EventReader:
    """Polls the backend's ring buffer (`Backend.events_fd`) and feeds each record to an
    EventSink. Poll from one thread; `run` loops until `stop` is set."""

    def __init__(self, events_fd: int, sink: EventSink) -> None:
        from trustdb.libbpf import RingBuffer  # only the daemon needs libbpf, not `trustdb log`

        self.sink = sink
        self._rb = RingBuffer(events_fd, self._on_record)

    def _on_record(self, data: bytes) -> None:
        self.sink.on_sample(data)

    def poll(self, timeout_ms: int = 100) -> int:
        """Wait up to timeout_ms; returns how many records were handled."""
        return self._rb.poll(timeout_ms)

    def drain(self) -> int:
        """Handle every record already in the buffer (at shutdown, before detaching)."""
        return self._rb.consume()

    def run(self, stop: threading.Event, timeout_ms: int = 100) -> None:
        while not stop.is_set():
            self.poll(timeout_ms)
        self.drain()

    @property
    def fileno(self) -> int:
        """epoll fd, readable when records wait (for a select loop)."""
        return self._rb.epoll_fd

    def close(self) -> None:
        self._rb.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


# --- reading the log back (`trustdb log`) ----------------------------------------------------


def follow_lines(
    path: Path,
    *,
    follow: bool,
    interval: float = 0.2,
    stop: Callable[[], bool] = lambda: False,
) -> Iterator[str]:
    """Complete lines of a log file (without newline). With `follow`, keep going as it grows,
    like `tail -F`: a partial last line is held until its newline arrives, and a truncated or
    rotated file is read again from its start. Raises FileNotFoundError only if not following."""
    f = None
    partial = b""
    while True:
        if f is None:
            try:
                f = open(path, "rb")  # noqa: SIM115 - reopened on rotation
            except FileNotFoundError:
                if not follow:
                    raise
        if f is not None:
            chunk = f.read(1 << 16)  # bounded: a log can be gigabytes
            if chunk:
                partial += chunk
                *lines, partial = partial.split(b"\n")
                for line in lines:
                    if line.strip():
                        yield line.decode("utf-8", "surrogateescape")
                continue
            if not follow:
                break
            if _replaced(path, f):
                f.close()
                f, partial = None, b""
                continue
        if stop():
            break
        time.sleep(interval)
    if f is not None:
        f.close()
    if partial.strip():  # not following: a last line without newline is still a line
        yield partial.decode("utf-8", "surrogateescape")


def _replaced(path: Path, f: Any) -> bool:
    """Was the file rotated (another inode at the path) or truncated below our position?"""
    try:
        st = os.stat(path)
    except FileNotFoundError:
        return False  # keep reading the old file until a new one appears
    mine = os.fstat(f.fileno())
    return (st.st_dev, st.st_ino) != (mine.st_dev, mine.st_ino) or st.st_size < f.tell()
