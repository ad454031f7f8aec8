"""Database verbs: trust, untrust, check, list, sources, status, verify.

Each verb parses its options, calls into walk/db/why, prints, and turns DatabaseError (and
HashingError) into one line and an exit code via common.fatal (common.ExitCode: 0 trusted,
1 not trusted / changed / missing, 3 trusted but some files failed, 4 no database, 5 no
permission, 6 busy, 7 other errors). Read verbs never create a database.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Annotated, Any, TypeVar

import typer

from trustdb.cli import app
from trustdb.cli.common import (
    DEFAULT_DB_PATH,
    DbOption,
    ExitCode,
    JsonOption,
    QuietOption,
    database_error_code,
    fatal,
    require_database,
)
from trustdb.cli.output import (
    human_size,
    iso_time,
    local_time,
    path_record_json,
    print_json,
    print_json_array,
    source_record_json,
)
from trustdb.cli.trust_verb import (  # noqa: F401  (default_source, source_kind: re-exported)
    TrustArgs,
    _problem,
    default_source,
    source_kind,
    trust_command,
)
from trustdb.db import TrustDB
from trustdb.dbrecords import DatabaseError, PathRecord
from trustdb.hashing import HashingError
from trustdb.why import Verdict, check_paths, verify

T = TypeVar("T")

STATUS_EXTRAS: list[Callable[[], dict[str, Any]]] = []
"""HOOK for other stages: functions returning extra `trustdb status` fields (snake_case name ->
JSON value; text output prints `name: value`, lists one item a line). The engine registers one
that names the running engines and backend: `STATUS_EXTRAS.append(fn)`. A hook that raises is
shown as `<name>: unavailable (<error>)`, never fails the verb. New fields belong in
schemas/status.json."""

PathsArg = Annotated[
    list[str],
    typer.Argument(metavar="PATH...", help="Files or directories.", show_default=False),
]
SourceOption = Annotated[
    str | None,
    typer.Option("--source", "-s", metavar="SOURCE", help="Trust source (e.g. deb:/, "
                 "dir:/home/u/build, manual).", show_default=False),
]
AllFilesOption = Annotated[
    bool, typer.Option("--all-files", help="Every regular file, not only executable content.")
]


def _query(db: Path, read: Callable[[TrustDB], T]) -> T:
    """One read of the database; a missing database is exit 4, a DatabaseError or HashingError
    one line and its exit code."""
    require_database(db)
    try:
        with TrustDB.open(db) as tdb:
            return read(tdb)
    except DatabaseError as e:
        fatal(str(e), database_error_code(e))
    except HashingError as e:
        fatal(str(e))


@app.command()
def trust(
    paths: PathsArg,
    source: SourceOption = None,
    all_files: AllFilesOption = False,
    json_output: JsonOption = False,
    quiet: QuietOption = False,
    db: DbOption = DEFAULT_DB_PATH,
) -> None:
    """Hash files and directories (recursively) and trust their content.

    Records executable content only (ELF, exec bit, #!) unless --all-files. The default source
    is `dir:PATH` for a single directory, `manual` otherwise. Problems are reported by path;
    the rest is recorded in one transaction, and the exit status is 3. A new database is
    created only inside an existing directory (and announced)."""
    trust_command(TrustArgs(paths, source, all_files, json_output, quiet, db))


@app.command()
def untrust(
    paths: Annotated[
        list[str] | None,
        typer.Argument(metavar="[PATH]...", help="Files or directories.", show_default=False),
    ] = None,
    source: SourceOption = None,
    json_output: JsonOption = False,
    db: DbOption = DEFAULT_DB_PATH,
) -> None:
    """Stop trusting paths (and everything recorded below a directory), of one source or all.

    With --source and no path, remove the whole source. Content another source still trusts
    stays trusted."""
    if not paths and not source:
        fatal("name paths to untrust, or a --source to remove", ExitCode.USAGE)
    require_database(db)
    try:
        with TrustDB.open(db, write=True) as tdb:
            if paths:
                real = [os.path.realpath(p) for p in paths]
                stats = tdb.remove_paths(real, source, recursive=True)
            else:
                assert source is not None
                stats = tdb.remove_source(source)
    except DatabaseError as e:
        fatal(str(e), database_error_code(e))
    if json_output:
        print_json({"removed": stats.removed, "generation": stats.generation})
    else:
        print(f"{stats.removed} entries removed")
    if stats.removed == 0:
        fatal(
            "nothing recorded there" + (f" for source {source!r}" if source else ""),
            ExitCode.UNTRUSTED,
        )


def _verdict_json(v: Verdict) -> dict[str, Any]:
    return {
        "path": v.path,
        "trusted": v.trusted,
        "reason": v.reason,
        "detail": v.detail,
        "digest": v.digest.hex() if v.digest else None,
        "sources": sorted({r.label for r in v.vouchers}),
    }


@app.command()
def check(
    paths: PathsArg,
    all_files: AllFilesOption = False,
    json_output: JsonOption = False,
    quiet: QuietOption = False,
    db: DbOption = DEFAULT_DB_PATH,
) -> None:
    """Is the current content of each file trusted? Exit 0 iff all are.

    Directories are checked for their executable content (every file with --all-files)."""
    verdicts = _query(db, lambda tdb: list(check_paths(tdb, paths, all_files=all_files)))
    if json_output:
        print_json([_verdict_json(v) for v in verdicts])
    else:
        for v in verdicts:
            if quiet and v.trusted:
                continue
            word = "trusted" if v.trusted else "NOT TRUSTED"
            print(f"{v.path}: {word}: {v.detail}")
    if not all(v.trusted for v in verdicts):
        raise typer.Exit(ExitCode.UNTRUSTED)


@app.command("list")
def list_entries(
    source: SourceOption = None,
    json_output: JsonOption = False,
    db: DbOption = DEFAULT_DB_PATH,
) -> None:
    """List trusted paths (of one source), sorted by path."""
    _query(db, lambda tdb: _print_records(tdb.iter_paths(source), json_output))


def _print_records(records: Iterator[PathRecord], json_output: bool) -> None:
    """As they are read, inside the one read transaction: memory does not grow with the
    database."""
    if json_output:
        print_json_array(path_record_json(r) for r in records)
        return
    for r in records:
        origin = f"  {r.origin}" if r.origin else ""
        print(f"{r.digest.hex()[:16]}  {r.label}  {r.path}{origin}")


@app.command()
def sources(json_output: JsonOption = False, db: DbOption = DEFAULT_DB_PATH) -> None:
    """List trust sources with their entry counts."""
    records = _query(db, TrustDB.sources)
    if json_output:
        print_json([source_record_json(s) for s in records])
        return
    for s in records:
        print(f"{s.label}  {s.kind}  {s.entries} entries  updated {local_time(s.updated)}")


@app.command()
def status(json_output: JsonOption = False, db: DbOption = DEFAULT_DB_PATH) -> None:
    """Show the database: path, schema, generation, counts, size on disk."""
    st = _query(db, TrustDB.status)
    info: dict[str, Any] = {
        "database": st.path,
        "schema": st.schema,
        "generation": st.generation,
        "entries": st.entries,
        "contents": st.contents,
        "sources": st.sources,
        "cached_verifications": st.cached_verifications,
        "size_on_disk": st.size_on_disk,
    }
    for extra in STATUS_EXTRAS:
        try:
            info.update(extra())
        except Exception as e:  # noqa: BLE001  a hook must never break status
            info[getattr(extra, "__name__", "hook")] = f"unavailable ({e})"
    if json_output:
        print_json(info)
        return
    info["size_on_disk"] = human_size(st.size_on_disk)
    for key, value in info.items():
        name = key.replace("_", " ")
        if isinstance(value, list):
            print(f"{name}:" + ("" if value else " none"))
            for item in value:
                words = " ".join(f"{k}={v}" for k, v in item.items() if v not in ("", None))
                print(f"  {words if isinstance(item, dict) else item}")
        else:
            print(f"{name}: {value}")


@app.command("verify")
def verify_command(
    source: SourceOption = None,
    json_output: JsonOption = False,
    db: DbOption = DEFAULT_DB_PATH,
) -> None:
    """Re-hash every recorded path (of one source); report missing and changed files."""
    checked, problems = _query(db, lambda tdb: verify(tdb, source))
    if json_output:
        print_json(
            {
                "paths": checked,
                "problems": [
                    {"path": p.record.path, "source": p.record.label, "reason": p.reason,
                     "trusted_at": iso_time(p.record.trusted_at)}
                    for p in problems
                ],
            }
        )
    else:
        for p in problems:
            _problem(
                p.record.path,
                f"{p.reason} (trusted by {p.record.label} at {local_time(p.record.trusted_at)})",
            )
        print(f"{checked} paths verified, {len(problems)} problems")
    if problems:
        raise typer.Exit(ExitCode.UNTRUSTED)
