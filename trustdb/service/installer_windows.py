"""Installer windows: the tokens in WINDOW_DIR, and the hooks' side of them (`trustdb service
installer-begin|end`, run by dpkg's pre-/post-invoke, dnf5's actions and the dnf4 plugin).

A token `<name>.open` holds the installer's pid: `PID` (the window is for a trusted installer
binary: the daemon still checks the writer's exe and inode) or `PID any START` (`installer-begin
--pid`, the dnf4 plugin: that very process, whatever its exe, is a trusted writer while the
window lives; START, its start time, keeps a reused pid out). Only root can create tokens: the
daemon reads them only from a root-owned directory no one else can write to, and only tokens
root owns (`trusted_directory`, `open_windows`).
"""

from __future__ import annotations

import contextlib
import os
import signal
import stat
import time
from dataclasses import dataclass
from pathlib import Path

from trustdb.state import STATE_DIR

INSTALLERS: dict[str, str] = {
    "/usr/bin/dpkg": "dpkg",
    "/bin/dpkg": "dpkg",
    "/usr/bin/rpm": "rpm",
    "/bin/rpm": "rpm",
    "/usr/bin/dnf5": "dnf5",
}
"""Executables whose writes are trusted while a window is open (by real path)."""

WINDOW_DIR = STATE_DIR / "installers"
IMPLICIT_SUFFIX = ".implicit"
"""The daemon's own tokens for an rpm run by hand (trustdb.service.handheld): they tell the
first-seen handler to ask, and open no window of their own."""


@dataclass(frozen=True, slots=True)
class Window:
    token: str
    installer_pid: int
    any_exe: bool = False
    """`installer-begin --pid`: this process is the writer, whatever it runs (dnf4: python)."""


def _stat_field(pid: int, index: int) -> int | None:
    """Field `index` of /proc/PID/stat counted after the command name (whose parentheses may
    hold spaces and ")"): 1 is the parent pid, 19 the start time."""
    try:
        stat_line = Path(f"/proc/{pid}/stat").read_text()
        return int(stat_line.rsplit(")", 1)[1].split()[index])
    except (OSError, ValueError, IndexError):
        return None


def start_time(pid: int) -> int | None:
    """The process's start time (clock ticks since boot): with the pid, names one process."""
    return _stat_field(pid, 19)


def parent_pid(pid: int) -> int | None:
    return _stat_field(pid, 1)


def trusted_directory(directory: Path = WINDOW_DIR) -> bool:
    """Root's, and writable by no one else: a token in it was put there by root."""
    try:
        st = os.lstat(directory)
    except OSError:
        return False
    return stat.S_ISDIR(st.st_mode) and st.st_uid == 0 and not st.st_mode & 0o022


def make_directory(directory: Path = WINDOW_DIR) -> None:
    directory.mkdir(mode=0o700, parents=True, exist_ok=True)
    with contextlib.suppress(OSError):
        os.chmod(directory, 0o700)


def _parse(path: Path) -> Window | None:
    try:
        st = os.lstat(path)
        fields = path.read_text().split()
    except OSError:
        return None
    if not stat.S_ISREG(st.st_mode) or st.st_uid != 0 or not fields:
        return None  # not root's: never a window
    try:
        pid = int(fields[0])
    except ValueError:
        return None
    if len(fields) >= 3 and fields[1] == "any":
        alive = start_time(pid)
        if alive is None or str(alive) != fields[2]:
            return Window(path.stem, 0)
        return Window(path.stem, pid, any_exe=True)
    return Window(path.stem, pid if Path(f"/proc/{pid}").exists() else 0)


def open_windows(directory: Path = WINDOW_DIR) -> list[Window]:
    """Windows whose installer process still lives (a crashed dpkg closes its window)."""
    if not trusted_directory(directory):
        return []
    out = []
    for p in sorted(directory.glob("*.open")):
        w = _parse(p)
        if w is not None and w.installer_pid:
            out.append(w)
        else:
            with contextlib.suppress(OSError):
                p.unlink()
    return out


def any_window_tokens(directory: Path = WINDOW_DIR) -> bool:
    """Cheap (one readdir): whether the first-seen handler should ask the daemon."""
    try:
        with os.scandir(directory) as it:
            return any(e.name.endswith((".open", IMPLICIT_SUFFIX)) for e in it)
    except OSError:
        return False


# --- the hooks' side (`trustdb service installer-begin|end`) -----------------------------------


def installer_pid() -> int:
    """The package manager that runs this hook: the parent of the hook's shell."""
    ppid = os.getppid()
    grand = parent_pid(ppid)
    if grand is None:
        return ppid
    try:
        exe = os.readlink(f"/proc/{ppid}/exe")
    except OSError:
        exe = ""
    return ppid if exe in INSTALLERS else grand


def begin(daemon_pids: list[int], timeout_s: float = 10.0, *, pid: int | None = None) -> bool:
    """Open a window and wait until the daemon has marked the filesystems; False if no daemon
    answered (nothing is enforcing, or it is not running: then new files stay untrusted).
    `pid`: that process is the window's writer whatever its exe (root only: the caller checks)."""
    make_directory()
    token = f"w{os.getpid()}-{time.time_ns()}"
    if pid is None:
        content = str(installer_pid())
    else:
        started = start_time(pid)
        if started is None:
            raise ProcessLookupError(f"no process {pid}")
        content = f"{pid} any {started}"
    tmp = WINDOW_DIR / f"{token}.tmp"
    tmp.write_text(content)
    tmp.rename(WINDOW_DIR / f"{token}.open")  # whole, or not at all
    return _signal_and_wait(daemon_pids, WINDOW_DIR / f"{token}.ack", timeout_s)


def end(daemon_pids: list[int], timeout_s: float = 30.0, *, pid: int | None = None) -> bool:
    """Close this installer's windows (call after the package database was imported)."""
    pid = installer_pid() if pid is None else pid
    for w in open_windows():
        if w.installer_pid == pid:
            with contextlib.suppress(OSError):
                (WINDOW_DIR / f"{w.token}.open").unlink()
            with contextlib.suppress(OSError):
                (WINDOW_DIR / f"{w.token}.ack").unlink()
    return _signal_and_wait(daemon_pids, None, timeout_s)


def _signal_and_wait(pids: list[int], ack: Path | None, timeout_s: float) -> bool:
    alive = []
    for pid in pids:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGUSR1)
            alive.append(pid)
    if not alive or ack is None:
        return bool(alive)
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if ack.exists():
            return True
        time.sleep(0.01)
    return False
