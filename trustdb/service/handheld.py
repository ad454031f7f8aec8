"""rpm run by hand (`rpm -i`, `rpm -U` with no dnf around it): an implicit installer window for
that one process.

rpm has no pre/post hook short of a C plugin, so the daemon watches rpm's exec events (the
installers' FAN_OPEN_EXEC inode marks, trustdb.service.installers). An rpm process whose binary's
inode the kernel trusts, running as root (real *and* effective uid 0, checked at the exec and at
each close), not started by the daemon itself, gets a window of its own: what *it* closes is
trusted `installed-by:rpm` from the close (source `installer:rpm@PID.START`), and when it exits the
daemon imports the rpm database rpm used (`--root`/`--dbpath` from its command line, else rpm's
default: Debian's rpm keeps it in $HOME/.rpmdb) and drops the window's source, so what the
rpmdb does not vouch for is revoked and reported. An rpm that wrote nothing (`rpm -q`) costs no
import.

Residual (README): the close-write marks go on when the daemon reads rpm's exec event; what rpm
closes before that (it reads its database and the package first, so in practice nothing) is not
trusted at close, only by the import at its exit.
"""

from __future__ import annotations

import contextlib
import os
import pwd
import time
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from trustdb.service.installer_windows import IMPLICIT_SUFFIX, WINDOW_DIR, parent_pid, start_time

if TYPE_CHECKING:
    from trustdb.db import TrustDB
    from trustdb.model import StreamItem
    from trustdb_importers.ondisk import PackageClaims

MAX_ANCESTRY = 64
CHUNK_FILES = 500
"""Files an rpm exit's import verifies in one go (about 25 ms natively, warm)."""
PIECE_FILES = 100
STEP_S = 0.05
"""How long one main-loop step of that import runs before the daemon polls again."""


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


def _check_root_owned(dbfile: str) -> None:
    """The rpmdb vouches for what rpm wrote, so only root may have been able to write it: the
    file, its directory, and that directory's parent (sticky allowed: nobody else can rename
    root's entries there). A root rpm run with a user's HOME (`sudo -E rpm`) or --dbpath
    would otherwise import headers that user forged. Raises OSError: the check then fails,
    and everything rpm wrote is revoked."""
    from trustdb.probecache import root_only

    directory = os.path.dirname(dbfile)
    for path in (dbfile, directory):
        if not root_only(os.stat(path)):
            raise OSError(f"{path}: not root's alone, so its rpmdb vouches for nothing")
    st = os.stat(os.path.dirname(directory))
    if not (root_only(st) or (st.st_uid == 0 and st.st_mode & 0o1000)):
        raise OSError(f"{os.path.dirname(directory)}: not root's alone, so the rpmdb under it "
                      "vouches for nothing")


def debian_dbpath(pid: int, root: str) -> str | None:
    """Debian's rpm keeps its database in $HOME/.rpmdb (%_dbpath), not where rpm-based systems
    do: that one, when the root has no rpmdb where those keep it (None: look there)."""
    from trustdb_importers.rpm import RPMDB_LOCATIONS

    if any((Path(root) / d / "rpmdb.sqlite").exists() for d in RPMDB_LOCATIONS):
        return None
    try:
        env = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
    except OSError:
        return None
    home = next((e[5:].decode(errors="replace") for e in env if e.startswith(b"HOME=")),
                pwd.getpwuid(0).pw_dir)  # no HOME: bash's ~ is the passwd entry's
    return os.path.join(home, ".rpmdb") if home.startswith("/") else None


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
        return f"installer:rpm@{self.pid}.{self.started}"  # a reused pid is another window

    @property
    def token(self) -> Path:
        return WINDOW_DIR / f"rpm-{self.pid}{IMPLICIT_SUFFIX}"

    def read_command_line(self) -> None:
        if not self.command_read:
            argv = command_line(self.pid)
            if self.alive() and argv:
                self.root, self.dbpath = rpm_databases(argv)
                if self.dbpath is None:
                    self.dbpath = debian_dbpath(self.pid, self.root)
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


class RpmdbCheck:
    """The import at an rpm's exit, in steps the daemon's main loop takes between its polls.

    A system's rpmdb holds 10^5 files: verified in one go (4.5 s for 100k warm files natively,
    bench/rpm_exit_import.py; tens of seconds under emulation) it held up the first-seen
    handler's questions, which are denied after ASK_TIMEOUT_S, and the watchdog. The headers
    are read in one statement (one snapshot) and parsed and verified CHUNK_FILES at a time,
    each chunk whole within its step (no verifying thread outlives a step: the daemon may fork
    its handler between steps). Nothing is written before the last step; the window's own
    source keeps what this rpm wrote trusted meanwhile, as while it ran. Then the rpmdb's files
    replace the source in one transaction and the window's source goes: what the rpmdb does
    not vouch for is revoked. A failed read revokes all that the rpm wrote (fail closed)."""

    def __init__(self, window: ImplicitWindow) -> None:
        from trustdb_importers.rpm import RpmDbImporter

        self.window = window
        self._importer = RpmDbImporter(root=window.root, dbpath=window.dbpath)
        self._dbfile = ""
        self._headers: list[tuple[int, bytes]] | None = None
        self._next = 0
        self._pieces: deque[PackageClaims] = deque()
        self._items: list[StreamItem] = []
        self._failed: str | None = None

    def step(self, db: TrustDB, budget_s: float = STEP_S) -> bool:
        """Verify for about `budget_s` (at least one chunk); True once nothing is left."""
        from trustdb_importers.interface import ImporterError

        deadline = time.monotonic() + budget_s
        try:
            if self._headers is None:
                self._dbfile = self._importer.find_rpmdb()
                _check_root_owned(self._dbfile)
                self._headers = self._importer.read_headers(self._dbfile)
            while not self._done():
                chunk = self._chunk(self._headers)
                self._items.extend(self._importer.verify(chunk, len(chunk), db.digest_cache()))
                if time.monotonic() >= deadline:
                    break
        except (ImporterError, OSError) as e:
            self._failed = str(e)
            return True
        return self._done()

    def _done(self) -> bool:
        return self._headers is not None and self._next >= len(self._headers) \
            and not self._pieces

    def _chunk(self, headers: list[tuple[int, bytes]]) -> list[PackageClaims]:
        """About CHUNK_FILES files, in pieces of at most PIECE_FILES (a package of 10^4 files,
        a kernel's modules, must not be one step; pieces are verified on parallel workers)."""
        out: list[PackageClaims] = []
        files = 0
        while files < CHUNK_FILES and (self._pieces or self._next < len(headers)):
            if not self._pieces:
                hnum, blob = headers[self._next]
                self._next += 1
                self._pieces.extend(_pieces(self._importer.package_claims(self._dbfile, hnum,
                                                                          blob)))
            out.append(self._pieces.popleft())
            files += max(1, len(out[-1].claims))
        return out

    def finish(self, db: TrustDB) -> list[str]:
        """Write the import, drop the window's source; returns the paths the rpmdb does not
        vouch for (revoked), with the reason if the import failed (everything revoked)."""
        from trustdb.dbrecords import DatabaseError

        failed = self._failed
        if failed is None:
            info = self._importer.source()  # another --dbpath than the root's own: its own
            try:
                db.replace_source(info.label, info.kind, self._items)
            except DatabaseError as e:
                failed = str(e)
        self._items = []
        db.remove_source(self.window.source)
        revoked = [p for p, d in self.window.trusted.items() if not db.is_trusted(d)]
        if failed:
            revoked.append(f"(the rpmdb import failed: {failed})")
        return revoked


def _pieces(package: PackageClaims) -> list[PackageClaims]:
    from trustdb_importers.ondisk import PackageClaims

    claims = package.claims
    if len(claims) <= PIECE_FILES:
        return [package]
    return [PackageClaims(package.origin, claims[i:i + PIECE_FILES],
                          package.skipped if i == 0 else ())
            for i in range(0, len(claims), PIECE_FILES)]
