"""`trustdb trust` without typer: the verb's work, and a parser for its plain command lines.

As for `run` (trustdb.cli.run_verb): typer, rich, click and the other verb modules are about
0.1 s of a trust's CPU, and a trust of a few large files is over in less than that once it
starts (issue 11: `trust --all-files` at b3sum's rate). The entry point (trustdb.cli.main)
tries `parse` before the CLI's imports; anything but the verb's own options in their plain
forms (`--help`, global options before the verb, `--`, an unknown option, a missing value, a
value or a path that looks like an option) returns None, and the typer verb, which owns every
usage message, takes the command line. The typer verb (trustdb.cli.db_commands.trust) runs
`trust_command` too; tests/cli/test_trust_verb.py checks that the two parse alike.

Standard library and trustdb only: nothing here may import typer.
"""

from __future__ import annotations

import errno
import os
import sys
import time
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

from trustdb.cli.exitcodes import ExitCode
from trustdb.cli.output import human_size, print_json
from trustdb.cli.run_verb import default_db, fail
from trustdb.db import TrustDB
from trustdb.dbrecords import BusyError, DatabaseError, DiskFullError, SchemaError
from trustdb.hashing import HashingError
from trustdb.hashpool import HashPool
from trustdb.walk import ScanProgress, scan


@dataclass(frozen=True)
class TrustArgs:
    """The command line of `trustdb trust`, parsed (by typer or by `parse`)."""

    paths: list[str]
    source: str | None = None
    all_files: bool = False
    json_output: bool = False
    quiet: bool = False
    db: Path = field(default_factory=default_db)


FLAG_OPTIONS = {"--all-files": "all_files", "--json": "json_output", "--quiet": "quiet",
                "-q": "quiet"}
VALUE_OPTIONS = {"--source": "source", "-s": "source", "--db": "db"}
"""Every option of the typer verb, by its flag, as the name of its TrustArgs field."""


def parse(args: Sequence[str]) -> TrustArgs | None:
    """`args` (the command line after the program name) as a `trust`, or None when it is not
    one or is not in the plain forms (the typer app then takes it). Options and paths may be
    interspersed, as click allows; a repeated option's last value wins, as in click."""
    if not args or args[0] != "trust":
        return None
    values: dict[str, object] = {}
    paths: list[str] = []
    i = 1
    while i < len(args):
        arg = args[i]
        if not arg.startswith("-"):
            paths.append(arg)
            i += 1
            continue
        name, eq, inline = arg.partition("=") if arg.startswith("--") else (arg, "", "")
        if name in FLAG_OPTIONS and not eq:
            values[FLAG_OPTIONS[name]] = True
            i += 1
            continue
        if name not in VALUE_OPTIONS:
            return None  # also `--`, `-`, `--help`, `-qs X`, `-sX`
        if eq:
            text, i = inline, i + 1
        elif i + 1 < len(args) and not args[i + 1].startswith("-"):
            text, i = args[i + 1], i + 2
        else:
            return None
        if not text:
            return None
        key = VALUE_OPTIONS[name]
        values[key] = Path(text) if key == "db" else text
    if not paths:
        return None
    return TrustArgs(paths=paths, **values)  # type: ignore[arg-type]


def database_error_code(e: BaseException) -> ExitCode:
    """The exit code for a database-stage error (its type, or its cause's errno)."""
    if isinstance(e, BusyError):
        return ExitCode.BUSY
    if isinstance(e, (SchemaError, DiskFullError)):
        return ExitCode.FAILED
    cause = e.__cause__
    if isinstance(cause, PermissionError) or getattr(cause, "errno", None) in (
        errno.EACCES,
        errno.EPERM,
    ):
        return ExitCode.NO_PERMISSION
    if isinstance(e, DatabaseError) and "Permission denied" in str(e):
        return ExitCode.NO_PERMISSION  # lmdb.Error carries no errno, only its text
    return ExitCode.FAILED



def prepare_new_database(db: Path, *, quiet: bool) -> None:
    """Write verbs: create a database only where a directory for it exists, and say so.

    `trust --db /typo/path` fails (no /typo) instead of creating a database nobody will ever
    look at. An existing empty directory (the package's /var/lib/trustdb) is used silently; a
    new directory inside an existing one is announced on stderr."""
    if os.path.exists(db / "data.mdb"):
        return
    if db.is_dir():
        if not os.access(db, os.W_OK | os.X_OK):
            fail(f"cannot create a database in {db}: permission denied", ExitCode.NO_PERMISSION)
        return
    if not db.parent.is_dir():
        fail(
            f"no trust database at {db}, and {db.parent} does not exist (create the directory "
            "first to start a new database there)",
            ExitCode.NO_DATABASE,
        )
    if not os.access(db.parent, os.W_OK | os.X_OK):
        fail(f"cannot create a database in {db.parent}: permission denied",
              ExitCode.NO_PERMISSION)
    if not quiet:
        print(f"trustdb: creating a new trust database at {db}", file=sys.stderr)

def default_source(paths: list[str]) -> tuple[str, str]:
    """(label, kind) when --source is not given: `dir:<realpath>` for one directory (so
    re-trusting a build directory updates one source), `manual` for anything else."""
    if len(paths) == 1 and os.path.isdir(paths[0]):
        return f"dir:{os.path.realpath(paths[0])}", "dir"
    return "manual", "manual"


def source_kind(label: str) -> str:
    """`dir:/x` -> `dir`; a label without a prefix is a `manual` source."""
    return label.split(":", 1)[0] if ":" in label else "manual"


def _problem(path: str, reason: str) -> None:
    print(f"trustdb: {path}: {reason}", file=sys.stderr)


@contextmanager
def _progress(enabled: bool) -> Iterator[Callable[[ScanProgress], None] | None]:
    """A rich progress line on stderr (files, bytes, rate), only on a terminal."""
    if not enabled:
        yield None
        return
    from rich.console import Console
    from rich.progress import Progress, SpinnerColumn, TextColumn, TimeElapsedColumn

    with Progress(
        SpinnerColumn(),
        TextColumn("{task.description}"),
        TimeElapsedColumn(),
        console=Console(stderr=True),
        transient=True,
    ) as bar:
        task = bar.add_task("walking")
        start = last = time.monotonic()

        def update(p: ScanProgress) -> None:
            nonlocal last
            now = time.monotonic()
            if now - last >= 0.1:  # rich redraws are costly; 10 per second is plenty
                last = now
                rate = p.bytes / max(now - start, 1e-6)
                bar.update(
                    task,
                    description=f"{p.files} files, {p.recorded} recorded, "
                    f"{human_size(p.bytes)} ({human_size(rate)}/s)",
                )

        yield update


def trust_command(a: TrustArgs) -> None:
    """Hash and record `a.paths`; exit 3 (SystemExit) when some files could not be trusted,
    with the usual one-line error and exit code for the rest."""
    paths, source, all_files, json_output, quiet, db = (
        a.paths, a.source, a.all_files, a.json_output, a.quiet, a.db
    )
    prepare_new_database(db, quiet=quiet or json_output)
    label, kind = (source, source_kind(source)) if source else default_source(paths)
    totals = ScanProgress(0, 0, 0)

    def track(p: ScanProgress) -> None:
        nonlocal totals
        totals = p
        if show is not None:
            show(p)

    try:
        with (
            HashPool() as pool,  # forked first: never a copy of a process inside a transaction
            TrustDB.open(db, write=True) as tdb,
            _progress(sys.stderr.isatty() and not json_output) as show,
        ):
            stats = tdb.add_entries(
                label,
                kind,
                lambda: scan(paths, all_files=all_files, pool=pool, on_progress=track),
            )
            skipped = tdb.last_skipped
    except DatabaseError as e:
        fail(str(e), database_error_code(e))
    except HashingError as e:
        fail(str(e))
    except KeyboardInterrupt:
        fail("interrupted; nothing was changed", code=130)
    problems = [s for s in skipped if s.fatal]
    benign = Counter(s.reason for s in skipped if not s.fatal)
    if json_output:
        print_json(
            {
                "database": str(db),
                "source": label,
                "generation": stats.generation,
                "files": totals.files,
                "recorded": totals.recorded,
                "bytes": totals.bytes,
                "added": stats.added,
                "unchanged": stats.unchanged,
                "problems": [{"path": s.path, "reason": s.reason} for s in problems],
                "skipped": [{"reason": r, "count": n} for r, n in sorted(benign.items())],
            }
        )
    else:
        for s in problems:
            _problem(s.path, s.reason)
    if not json_output and not quiet:
        notes = "".join(f"; {n} skipped: {reason}" for reason, n in sorted(benign.items()))
        print(
            f"{label}: {totals.recorded} of {totals.files} files recorded "
            f"({human_size(totals.bytes)}), {stats.added} new or changed, "
            f"{stats.unchanged} unchanged{notes}"
            + (f"; {len(problems)} problems" if problems else "")
        )
    if problems:
        raise SystemExit(int(ExitCode.PARTIAL))
