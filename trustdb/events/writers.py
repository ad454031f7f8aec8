"""Writers: bytes -> somewhere (file, syslog, journal, null), and reading the file log back."""

from __future__ import annotations

import os
import socket
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, Protocol

DEFAULT_LOG = Path("/var/log/trustdb/decisions.jsonl")
LOG_ENV = "TRUSTDB_LOG"


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


class JournalWriter:
    """Sends each record (JournalSerializer's native protocol) to journald's socket. Without a
    journal (a container, the test guest) records are dropped: the file log is the record."""

    SOCKET = "/run/systemd/journal/socket"

    def __init__(self, address: str = SOCKET) -> None:
        self._address = address
        self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
        self.dropped = 0

    def write(self, record: bytes) -> None:
        try:
            self._sock.sendto(record, self._address)
        except OSError:
            self.dropped += 1

    def close(self) -> None:
        self._sock.close()


class NullWriter:
    def write(self, record: bytes) -> None:
        pass

    def close(self) -> None:
        pass


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

