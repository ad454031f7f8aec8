"""`trustdb import rpm|deb|python`: run one importer per source, each in one transaction.

Thin on purpose: build the importer, hand `importer.collect(db.digest_cache())` to
`TrustDB.replace_source`, then report. Quiet where nothing is wrong: files that fail
verification are always listed, benign skips (missing on disk, not executable) only with
--verbose. Exit codes (common.ExitCode):
  0    imported, every file the source names was verified (or benignly skipped)
  3    imported, but some files failed verification (mismatch, unreadable): they are listed and
       were not trusted
  4-7  refused: nothing was written for the source named in the error (6: database busy)
"""

from __future__ import annotations

import json
import sys
import time
from collections.abc import Iterable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from trustdb.cli import app
from trustdb.cli.common import (
    DEFAULT_DB_PATH,
    DbOption,
    ExitCode,
    JsonOption,
    QuietOption,
    VerboseOption,
    database_error_code,
    fatal,
    prepare_new_database,
)
from trustdb.db import TrustDB
from trustdb.dbrecords import DatabaseError, WriteStats
from trustdb.model import SkippedEntry, StreamItem
from trustdb_importers.interface import Importer, ImporterError
from trustdb_importers.ondisk import ImportStats, OnDiskImporter

EXIT_REFUSED = ExitCode.FAILED
EXIT_UNVERIFIED = ExitCode.PARTIAL

import_app = typer.Typer(
    name="import",
    help="Trust the files a package manager installed, verified against its own digests.",
    epilog="Exit status: 0 imported; 3 imported, but the files listed as FAILED did not verify "
    "and are not trusted; 4 or more: refused, nothing written for the source named.",
    no_args_is_help=True,
)
app.add_typer(import_app, name="import")

RootOption = Annotated[
    Path,
    typer.Option("--root", metavar="DIR", help="Root directory the package database describes."),
]
AllFilesOption = Annotated[
    bool,
    typer.Option(
        "--all-files",
        help="Record every verified file, not only executable content (ELF, #!, exec bit).",
    ),
]


@dataclass(slots=True)
class Outcome:
    """What importing one source did, for the summary."""

    source: str
    kind: str
    stats: ImportStats | None = None
    write: WriteStats | None = None
    skipped: list[SkippedEntry] = field(default_factory=list)
    seconds: float = 0.0
    error: str | None = None
    code: ExitCode = EXIT_REFUSED
    """The exit code the error causes (6 for a busy database)."""


@import_app.command("deb")
def import_deb(
    root: RootOption = Path("/"),
    admindir: Annotated[
        Path | None,
        typer.Option("--admindir", metavar="DIR",
                     help="dpkg database directory (default: ROOT/var/lib/dpkg)."),
    ] = None,
    all_files: AllFilesOption = False,
    db: DbOption = DEFAULT_DB_PATH,
    json_out: JsonOption = False,
    quiet: QuietOption = False,
    verbose: VerboseOption = False,
) -> None:
    """Installed Debian packages (dpkg status, md5sums): verify each file's MD5 on disk, then
    record its BLAKE3 (both from one read). Mismatches are listed and not trusted."""
    admin = str(admindir) if admindir else None
    from trustdb_importers.deb import DebImporter  # each parser on first use (start-up time)

    _run([DebImporter(root=str(root), admindir=admin, all_files=all_files)], db, json_out, quiet, verbose)


@import_app.command("rpm")
def import_rpm(
    files: Annotated[
        list[Path] | None,
        typer.Argument(metavar="[RPM]...",
                       help="Package files to import; without any, the installed rpmdb."),
    ] = None,
    root: RootOption = Path("/"),
    dbpath: Annotated[
        str | None,
        typer.Option("--dbpath", metavar="DIR",
                     help="rpmdb directory inside ROOT (default: where it is found)."),
    ] = None,
    all_files: AllFilesOption = False,
    db: DbOption = DEFAULT_DB_PATH,
    json_out: JsonOption = False,
    quiet: QuietOption = False,
    verbose: VerboseOption = False,
) -> None:
    """RPM packages: .rpm files (each member checked against its header digest; one source
    `rpmfile:NAME.ARCH` per package), or the installed rpmdb.sqlite of ROOT (each file verified
    on disk; source `rpm:ROOT`, or `rpm:ROOT#DIR` for a --dbpath other than the root's own)."""
    from trustdb_importers.rpm import RpmDbImporter, RpmFileImporter

    importers: list[Importer]
    if files:
        importers = [RpmFileImporter(path=str(f), all_files=all_files) for f in files]
    else:
        importers = [RpmDbImporter(root=str(root), dbpath=dbpath, all_files=all_files)]
    _run(importers, db, json_out, quiet, verbose)


@import_app.command("python")
def import_python(
    paths: Annotated[
        list[Path],
        typer.Argument(metavar="DIR...", help="Venvs, prefixes or site-packages dirs."),
    ],
    all_files: AllFilesOption = False,
    db: DbOption = DEFAULT_DB_PATH,
    json_out: JsonOption = False,
    quiet: QuietOption = False,
    verbose: VerboseOption = False,
) -> None:
    """Python environments: verify every file against its distribution's RECORD (SHA-256),
    record it as `name==version`. One source `python:PATH` per path."""
    from trustdb_importers.python import PythonImporter

    importers: list[Importer] = [PythonImporter(path=str(p), all_files=all_files) for p in paths]
    _run(importers, db, json_out, quiet, verbose)


def _run(
    importers: list[Importer], db_path: Path, json_out: bool, quiet: bool, verbose: bool
) -> None:
    """Import each source in its own transaction; a refused source does not stop the others."""
    prepare_new_database(db_path, quiet=quiet or json_out)
    try:
        db = TrustDB.open(db_path, write=True)
    except DatabaseError as e:
        fatal(str(e), database_error_code(e))
    show = not json_out and sys.stderr.isatty()
    outcomes: list[Outcome] = []
    codes: list[ExitCode] = []
    with db:
        for importer in importers:
            outcome = _import_one(db, importer, show)
            outcomes.append(outcome)
            if outcome.error is not None:
                codes.append(outcome.code)
            if not json_out:
                _print_outcome(outcome, quiet=quiet, verbose=verbose)
    if json_out:
        print(json.dumps({"sources": [_json(o) for o in outcomes]}, indent=2))
    errors = [o.error for o in outcomes if o.error is not None]
    if errors:
        # One line per refused source; the other sources were imported (and printed) above.
        for error in errors[:-1]:
            print(f"trustdb: error: {error}", file=sys.stderr)
        fatal(errors[-1], codes[-1] if codes else EXIT_REFUSED)
    if any(s.fatal for o in outcomes for s in o.skipped):
        raise typer.Exit(EXIT_UNVERIFIED)


def _import_one(db: TrustDB, importer: Importer, show: bool) -> Outcome:
    start = time.monotonic()
    try:
        src = importer.source()
    except ImporterError as e:
        return Outcome(source=f"{importer.name}:?", kind=importer.name, error=str(e))
    outcome = Outcome(source=src.label, kind=src.kind, stats=getattr(importer, "stats", None))
    try:
        # Streamed into the transaction, not collected first: the database takes each entry's
        # arrival time as its hash time when it decides whether the inode may be cached.
        with _progress(importer, src.label, show):
            items = importer.collect(db.digest_cache())
            outcome.write = db.replace_source(src.label, src.kind, _tee(items, outcome.skipped))
    except (ImporterError, DatabaseError) as e:
        outcome.error = str(e)
        outcome.write = None
        if isinstance(e, DatabaseError):
            outcome.code = database_error_code(e)
    outcome.seconds = time.monotonic() - start
    return outcome


def _tee(items: Iterable[StreamItem], skipped: list[SkippedEntry]) -> Iterator[StreamItem]:
    for item in items:
        if isinstance(item, SkippedEntry):
            skipped.append(item)
        yield item


class _progress:
    """A rich progress bar on a terminal, fed by the importer's per-package callback."""

    def __init__(self, importer: Importer, label: str, show: bool) -> None:
        self.importer = importer if isinstance(importer, OnDiskImporter) else None
        self.label = label
        self.bar: Progress | None = None
        if show and isinstance(importer, OnDiskImporter):
            self.bar = Progress(
                TextColumn("[bold]{task.description}"),
                BarColumn(),
                MofNCompleteColumn(),
                TextColumn("packages  {task.fields[detail]}"),
                TimeElapsedColumn(),
                console=Console(stderr=True),
                transient=True,
            )

    def __enter__(self) -> None:
        if self.bar is None or self.importer is None:
            return
        bar = self.bar
        task = bar.add_task(self.label, total=None, detail="")
        stats = self.importer.stats

        def update(done: int, total: int) -> None:
            detail = f"{stats.files} files, {stats.bytes_hashed / 1e6:.0f} MB hashed"
            bar.update(task, completed=done, total=total, detail=detail)

        self.importer.progress = update
        bar.start()

    def __exit__(self, *exc: object) -> None:
        if self.bar is not None:
            self.bar.stop()


def _print_outcome(o: Outcome, *, quiet: bool, verbose: bool) -> None:
    if o.error is not None:
        return  # printed once, at the end, with the exit code it causes
    for s in o.skipped:
        if not s.fatal and not verbose:
            continue
        mark = "FAILED " if s.fatal else "skipped"
        origin = f" [{s.origin}]" if s.origin else ""
        print(f"  {mark} {s.path}{origin}: {s.reason}")
    st, w = o.stats, o.write
    if quiet:
        return
    parts = [f"{o.source}:"]
    if st is not None:
        parts.append(
            f"{st.packages} packages, {st.files} files: {st.recorded} trusted, "
            f"{st.not_executable} not executable, {st.skipped} skipped ({st.fatal} failed"
            f"{'' if verbose or st.skipped == st.fatal else '; --verbose lists them'}); "
            f"{st.bytes_hashed / 1e6:.1f} MB hashed, {st.cache_hits} unchanged files not re-read"
            f"{f' ({st.packages_kept} packages unchanged)' if st.packages_kept else ''};"
        )
    if w is not None:
        parts.append(
            f"db: {w.added} added, {w.removed} removed, {w.unchanged} unchanged, "
            f"generation {w.generation};"
        )
    parts.append(f"{o.seconds:.1f} s")
    print(" ".join(parts))


def _json(o: Outcome) -> dict[str, Any]:
    return {
        "source": o.source,
        "kind": o.kind,
        "error": o.error,
        "seconds": round(o.seconds, 3),
        "stats": asdict(o.stats) if o.stats is not None else None,
        "write": asdict(o.write) if o.write is not None else None,
        "skipped": [
            {"path": s.path, "origin": s.origin, "reason": s.reason, "fatal": s.fatal}
            for s in o.skipped
        ],
    }
