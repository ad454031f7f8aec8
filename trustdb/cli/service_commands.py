"""`trustdb service ...`: the workstation service's verbs (stop, preflight, status,
audit-summary, installer-begin/-end). Each parses, calls one function of trustdb.service, and
turns its errors into one line and an exit code."""

from __future__ import annotations

import json
import os
import signal
from pathlib import Path
from typing import Annotated

import typer

from trustdb.cli import app
from trustdb.cli.common import DEFAULT_DB_PATH, DbOption, JsonOption, fatal
from trustdb.events import DEFAULT_LOG, LOG_ENV

service_app = typer.Typer(
    help="The system-wide service: preflight, audit summary, status, stop.",
    no_args_is_help=True,
)
app.add_typer(service_app, name="service")


def _need_root() -> None:
    if os.geteuid() != 0:
        fatal("this needs root")


@service_app.command()
def stop(
    from_unit: Annotated[
        bool,
        typer.Option("--from-unit", help="Run by the unit's ExecStop: keep the pins when the "
                     "daemon died on its own (systemd restarts it; only a stop unpins)."),
    ] = False,
) -> None:
    """End system-wide enforcement: unpin the programs and maps, stop the daemon."""
    from trustdb.service.pins import PinStore
    from trustdb.state import running_engines

    _need_root()
    # systemd runs ExecStop also after a crash, before the automatic restart: then MAINPID is
    # unset (or SERVICE_RESULT is not success), and unpinning would fail open until the restart.
    if from_unit and (not os.environ.get("MAINPID")
                      or os.environ.get("SERVICE_RESULT", "success") != "success"):
        typer.echo("trustdb: the daemon exited on its own: the pins stay (it will be restarted)")
        return
    if from_unit:
        from trustdb.service.unitjob import restarting

        if restarting():
            typer.echo("trustdb: a restart, not a stop: the pins stay (the new daemon adopts them)")
            return
    gone = PinStore().unpin_all()
    for s in running_engines():
        if s.kind == "daemon" and s.pid != os.getpid():
            try:
                os.kill(s.pid, signal.SIGTERM)
            except ProcessLookupError:
                pass
    typer.echo(f"trustdb: system-wide enforcement stopped ({len(gone)} pinned engine(s) removed)")


@service_app.command()
def preflight(db: DbOption = DEFAULT_DB_PATH, as_json: JsonOption = False) -> None:
    """List what enforcing now would deny that this machine or trustdb itself needs; exit 1 if
    anything (the daemon refuses `--mode enforce` in that case)."""
    import trustdb.daemon  # noqa: F401  load what the daemon loads: its mappings are checked
    from trustdb.service import preflight as pf

    problem, findings = pf.check(db)
    if as_json:
        typer.echo(json.dumps({"problem": problem, "untrusted": [
            {"path": f.path, "why": f.why, "problem": f.problem} for f in findings]}, indent=2))
    elif problem:
        typer.echo(f"trustdb: {problem}")
    else:
        for f in findings:
            typer.echo(f.line(None if db == DEFAULT_DB_PATH else db))
        typer.echo(f"{len(findings)} needed file(s) not trusted" if findings
                   else "ok: everything the service, its hooks, boot and login need is trusted")
    if problem or findings:
        raise typer.Exit(code=1)


@service_app.command("audit-summary")
def audit_summary(
    file: Annotated[Path, typer.Option("--file", envvar=LOG_ENV, help="Decision log.")]
    = DEFAULT_LOG,
    db: DbOption = DEFAULT_DB_PATH,
    as_json: JsonOption = False,
) -> None:
    """What would have been denied (audit mode), by file and by program, with the command that
    trusts each file: read it before switching to enforce."""
    from trustdb.events import follow_lines, parse_json_line
    from trustdb.service.audit import summarize

    def decisions():  # type: ignore[no-untyped-def]
        for line in follow_lines(file, follow=False):
            try:
                yield parse_json_line(line)
            except ValueError:
                continue

    try:
        summary = summarize(decisions())
    except FileNotFoundError:
        fatal(f"no decision log at {file} (set --file or {LOG_ENV})")
    if as_json:
        typer.echo(json.dumps({"total": summary.total, "files": [
            {"path": f.path, "count": f.count, "programs": list(f.programs),
             "hooks": list(f.hooks), "command": f.command()} for f in summary.files],
            "programs": summary.programs}, indent=2))
        return
    for line in summary.lines(None if db == DEFAULT_DB_PATH else db):
        typer.echo(line)


@service_app.command("status")
def service_status(as_json: JsonOption = False) -> None:
    """The pinned engine (backend, mode, database generation) and the daemon that owns it."""
    from trustdb.service.pins import PinStore
    from trustdb.state import running_engines

    store = PinStore()
    record = store.current()
    daemons = [s for s in running_engines() if s.kind == "daemon"]
    info = {
        "enforcing": record is not None,
        "pinned": None if record is None else {
            "backend": record.backend, "mode": record.mode, "generation": record.generation,
            "instance": record.instance, "object_sha256": record.object_sha256},
        "instances": store.instances(),
        "daemon_pids": [s.pid for s in daemons],
        "modes": [line for s in daemons for line in s.modes],
    }
    if as_json:
        typer.echo(json.dumps(info, indent=2))
        return
    if record is None:
        typer.echo("not enforcing: no pinned engine")
    else:
        typer.echo(f"enforcing system-wide: {record.backend} backend, {record.mode} mode, "
                   f"database generation {record.generation} (pinned: kept if the daemon dies)")
    typer.echo("daemon: " + (", ".join(f"pid {p}" for p in info["daemon_pids"])  # type: ignore
                             if daemons else "not running"))
    for line in info["modes"]:  # type: ignore[attr-defined]
        typer.echo(f"mode: {line}")


def _daemon_pids() -> list[int]:
    from trustdb.state import running_engines

    return [s.pid for s in running_engines() if s.kind == "daemon"]


@service_app.command("installer-begin", hidden=True)
def installer_begin(
    pid: Annotated[
        int | None, typer.Option("--pid", help="This process writes, whatever it runs (dnf4).")
    ] = None,
) -> None:
    """dpkg's pre-invoke hook: trust what this dpkg run writes, from the moment it closes each
    file (the daemon watches close-writes of trusted installers until installer-end). With
    --pid (the dnf4 plugin: dnf is a python process), that process is the trusted writer."""
    from trustdb.service import installers

    _need_root()
    try:
        answered = installers.begin(_daemon_pids(), pid=pid)
    except ProcessLookupError as e:
        fatal(f"installer-begin: {e}")
    if not answered:
        typer.echo("trustdb: no service answered: files this transaction writes stay untrusted "
                   "until the import", err=True)


@service_app.command("installer-end", hidden=True)
def installer_end(
    admindir: Annotated[
        Path | None, typer.Option("--admindir", help="dpkg database (default: dpkg's own).")
    ] = None,
    rpm: Annotated[
        bool, typer.Option("--rpm", help="Verify against the rpm database instead (dnf/rpm).")
    ] = False,
    rpm_dbpath: Annotated[
        str | None, typer.Option("--rpm-dbpath", help="rpm database directory (with --rpm).")
    ] = None,
    rpm_root: Annotated[
        str, typer.Option("--rpm-root", help="root whose rpmdb to import (dnf --installroot).")
    ] = "/",
    pid: Annotated[
        int | None, typer.Option("--pid", help="the process given to installer-begin --pid.")
    ] = None,
    db: DbOption = DEFAULT_DB_PATH,
) -> None:
    """dpkg's post-invoke hook (dnf5's post_transaction action with --rpm): import the package
    database (what it vouches for stays trusted), then close the window (what it does not vouch
    for loses the trust it got at close, reported)."""
    from trustdb.db import TrustDB
    from trustdb.dbrecords import DatabaseError
    from trustdb.service import installers
    from trustdb_importers.deb import DebImporter
    from trustdb_importers.interface import Importer, ImporterError

    _need_root()
    admin = str(admindir) if admindir else os.environ.get("DPKG_ADMINDIR") or None
    failed = None
    try:
        with TrustDB.open(db, write=True) as tdb:
            importer: Importer
            if rpm:  # imported only here: what dpkg's hook maps stays what it always mapped
                from trustdb_importers.rpm import RpmDbImporter

                importer = RpmDbImporter(root=rpm_root, dbpath=rpm_dbpath)
            else:
                importer = DebImporter(root="/", admindir=admin)
            tdb.replace_source(importer.source().label, importer.source().kind,
                               importer.collect(tdb.digest_cache()))
    except (DatabaseError, ImporterError, OSError) as e:
        failed = str(e)
    installers.end(_daemon_pids(), pid=pid)
    if failed:
        fatal(f"import {'rpm' if rpm else 'deb'} refused ({failed}): what this transaction "
              "installed is not trusted")


@service_app.command("trust-self")
def trust_self(
    db: DbOption = DEFAULT_DB_PATH,
    json_out: JsonOption = False,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="Print only problems.")] = False,
) -> None:
    """Record trustdb's own install as the source `self:trustdb`, every file verified against
    its own digests (wheel RECORD SHA-256; the .deb's md5sums or install.sh's SHA-256 list for
    the launcher). install.sh, the .deb postinst and the rpm %post run this."""
    from trustdb.cli.import_commands import _run
    from trustdb.service.selfinstall import SelfImporter

    _run([SelfImporter()], db, json_out, quiet, False)
