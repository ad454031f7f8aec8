"""rpm run by hand (`rpm -i`, `rpm -U` with no dnf around it): an implicit installer window for
that one process.

rpm has no pre/post hook short of a C plugin, so the daemon watches rpm's exec events (the
installers' FAN_OPEN_EXEC inode marks, trustdb.service.installers). An rpm process whose binary's
inode the kernel trusts, running as root (real *and* effective uid 0, checked at the exec and at
each close), not started by the daemon itself, gets a window of its own: what *it* closes is
trusted `installed-by:rpm` from the close (source `installer:rpm@PID`), and when it exits the
daemon imports the rpm database rpm used (`--root`/`--dbpath` from its command line, else rpm's
default) and drops the window's source, so what the rpmdb does not vouch for is revoked and
reported. An rpm that wrote nothing (`rpm -q`) costs no import.

Residual (README): the close-write marks go on when the daemon reads rpm's exec event; what rpm
closes before that (it reads its database and the package first, so in practice nothing) is not
trusted at close, only by the import at its exit.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from trustdb.service.installer_windows import IMPLICIT_SUFFIX, WINDOW_DIR, parent_pid, start_time

if TYPE_CHECKING:
    from trustdb.db import TrustDB

MAX_ANCESTRY = 64


def runs_as_root(pid: int) -> bool:
    """Real, effective, saved and filesystem uids all 0 (a setuid-dropped or user rpm is not)."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("Uid:"):
                return all(u == "0" for u in line.split()[1:5])
    except OSError:
        pass
    return False


def descends_from(pid: int, ancestor: int) -> bool:
    """Whether `ancestor` started `pid` (directly or not): the daemon's own rpm processes."""
    for _ in range(MAX_ANCESTRY):
        pid = parent_pid(pid) or 0
        if pid == ancestor:
            return True
        if pid <= 1:
            return False
    return True  # deeper than any real tree: do not trust it


def rpm_databases(argv: list[str]) -> tuple[str, str | None]:
    """(--root, --dbpath) of an rpm command line (`--root R`, `--root=R`, `-r R`)."""
    found: dict[str, str] = {}
    names = {"--root": "root", "-r": "root", "--dbpath": "dbpath"}
    i = 0
    while i < len(argv):
        arg = argv[i]
        name, eq, value = arg.partition("=")
        if eq and name in ("--root", "--dbpath"):
            found[names[name]] = value
        elif arg in names and i + 1 < len(argv):
            found[names[arg]] = argv[i + 1]
            i += 1
        i += 1
    return found.get("root", "/"), found.get("dbpath")


def command_line(pid: int) -> list[str]:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="replace").split("\0")
    except OSError:
        return []


@dataclass(slots=True)
class ImplicitWindow:
    pid: int
    started: int
    root: str = "/"
    dbpath: str | None = None
    """rpm's --root and --dbpath, read at its first close-write (at its exec event, /proc
    may still show the command line of the process that exec'd it)."""
    command_read: bool = False
    trusted: dict[str, bytes] = field(default_factory=dict)
    """Path -> digest trusted at close by this rpm."""

    @property
    def source(self) -> str:
        return f"installer:rpm@{self.pid}"

    @property
    def token(self) -> Path:
        return WINDOW_DIR / f"rpm-{self.pid}{IMPLICIT_SUFFIX}"

    def read_command_line(self) -> None:
        if not self.command_read:
            argv = command_line(self.pid)
            if self.alive() and argv:
                self.root, self.dbpath = rpm_databases(argv)
                self.command_read = True

    def alive(self) -> bool:
        return start_time(self.pid) == self.started

    def open(self) -> None:
        """The token the first-seen handler looks for before it asks the daemon."""
        with contextlib.suppress(OSError):
            self.token.write_text(str(self.pid))

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self.token.unlink()


def implicit_window(pid: int, daemon_pid: int) -> ImplicitWindow | None:
    """A window for rpm process `pid` (its exec event was just read), or None: not root, gone,
    or one of the daemon's own."""
    started = start_time(pid)
    if started is None or not runs_as_root(pid) or descends_from(pid, daemon_pid):
        return None
    return ImplicitWindow(pid, started)


def verify(db: TrustDB, window: ImplicitWindow) -> list[str]:
    """Import the rpmdb the window's rpm used, drop the window's source; returns the paths the
    rpmdb does not vouch for (revoked). A failed import revokes everything (fail closed)."""
    from trustdb.dbrecords import DatabaseError
    from trustdb_importers.interface import ImporterError
    from trustdb_importers.rpm import RpmDbImporter

    failed = None
    try:
        importer = RpmDbImporter(root=window.root, dbpath=window.dbpath)
        info = importer.source()  # another --dbpath than the root's own is its own source
        db.replace_source(info.label, info.kind, importer.collect(db.digest_cache()))
    except (DatabaseError, ImporterError, OSError) as e:
        failed = str(e)
    db.remove_source(window.source)
    revoked = [p for p, d in window.trusted.items() if not db.is_trusted(d)]
    if failed:
        revoked.append(f"(the rpmdb import failed: {failed})")
    return revoked
