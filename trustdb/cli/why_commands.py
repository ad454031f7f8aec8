"""`trustdb why PATH|PID|event:N`: why a file is (not) trusted, the nearest trusted content,
and the exact command that would allow it. The explaining is trustdb.why's."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

import typer

from trustdb.cli import app
from trustdb.cli.common import (
    DEFAULT_DB_PATH,
    DbOption,
    ExitCode,
    JsonOption,
    database_error_code,
    fatal,
    require_database,
)
from trustdb.cli.log_commands import LogFileOption, read_decisions
from trustdb.cli.output import local_time, path_record_json, print_json
from trustdb.db import TrustDB
from trustdb.dbrecords import DatabaseError
from trustdb.events import DEFAULT_LOG, Decision
from trustdb.why import Explanation, executable_files_of, explain_path


@app.command()
def why(
    target: Annotated[
        str,
        typer.Argument(metavar="PATH|PID|event:N",
                       help="A file; a running process (its executable and every file it maps "
                       "executable); or decision N of `trustdb log` (event:-1: the last denial)."),
    ],
    json_output: JsonOption = False,
    file: LogFileOption = DEFAULT_LOG,
    db: DbOption = DEFAULT_DB_PATH,
) -> None:
    """Explain a denial: the key the kernel sees, whether the content is trusted and by whom,
    the nearest trusted content (same path in another source, same package at another version,
    same file name), and the exact command that would allow it. Exit 0 iff all is trusted."""
    require_database(db)
    targets, decision = _resolve(target, file)
    try:
        with TrustDB.open(db) as tdb:
            denied_key = (decision.dev, decision.ino) if decision else None
            found = [explain_path(tdb, p, denied_key=denied_key) for p in targets]
    except DatabaseError as err:
        fatal(str(err), database_error_code(err))
    if json_output:
        print_json({"target": target, "decision": decision.to_dict() if decision else None,
                    "files": [_json(x) for x in found]})
    else:
        if decision is not None:
            print(f"decision: {decision.verdict.name.lower()} {decision.hook.name.lower()} of "
                  f"{decision.path} by {decision.comm}[{decision.tgid}] ({decision.reason})")
        for x in found:
            _print(x)
    if not all(x.verdict.trusted for x in found):
        raise typer.Exit(ExitCode.UNTRUSTED)


def _resolve(target: str, log: Path) -> tuple[list[str], Decision | None]:
    if target.startswith("event:"):
        return _from_log(target.removeprefix("event:"), log)
    if target.isdigit():
        try:
            return executable_files_of(int(target)), None
        except FileNotFoundError:
            fatal(f"no process {target}", ExitCode.UNTRUSTED)
        except PermissionError:
            fatal(f"cannot read /proc/{target}: permission denied", ExitCode.NO_PERMISSION)
    return [target], None


def _from_log(which: str, log: Path) -> tuple[list[str], Decision]:
    try:
        index = int(which)
    except ValueError:
        fatal(f"event:N needs a record number, not {which!r}", ExitCode.USAGE)
    try:
        if index < 0:
            denials = [d for _, d in read_decisions(log) if d.denied]
            if len(denials) < -index:
                fatal(f"{log} holds {len(denials)} denials", ExitCode.UNTRUSTED)
            decision = denials[index]
        else:
            found = [d for n, d in read_decisions(log) if n == index]
            if not found:
                fatal(f"{log} has no record {index}", ExitCode.UNTRUSTED)
            decision = found[0]
    except FileNotFoundError:
        fatal(f"no decision log at {log} (set --file or TRUSTDB_LOG)", ExitCode.NO_DATABASE)
    except PermissionError:
        fatal(f"cannot read {log}: permission denied", ExitCode.NO_PERMISSION)
    if not decision.path:
        fatal("that decision names no file", ExitCode.FAILED)
    return [decision.path], decision


def _print(e: Explanation) -> None:
    v = e.verdict
    key = f"dev {e.key.dev} ino {e.key.ino} ctime {e.key.ctime_sec}.{e.key.ctime_nsec:09d}" \
        if e.key else "none (no such file now)"
    print(f"{e.path}:")
    print(f"  kernel key: {key}")
    if v.digest:
        print(f"  content:    blake3 {v.digest.hex()}")
    print(f"  trusted:    {'yes, ' if v.trusted else 'no: '}{v.detail}")
    for r in v.vouchers:
        print(f"    by {r.label} as {r.path} (since {local_time(r.trusted_at)})")
    for n in e.nearest:
        r = n.record
        origin = f" [{r.origin}]" if r.origin else ""
        print(f"  nearest ({n.relation}): {r.path} by {r.label}{origin}, "
              f"blake3 {r.digest.hex()[:16]}")
    if e.note:
        print(f"  note:       {e.note}")
    if e.fix:
        print(f"  to allow:   {e.fix}")


def _json(e: Explanation) -> dict[str, Any]:
    v = e.verdict
    return {
        "path": e.path,
        "key": {"dev": e.key.dev, "ino": e.key.ino, "ctime_sec": e.key.ctime_sec,
                "ctime_nsec": e.key.ctime_nsec} if e.key else None,
        "digest": v.digest.hex() if v.digest else None,
        "trusted": v.trusted,
        "reason": v.reason,
        "detail": v.detail,
        "sources": [path_record_json(r) for r in v.vouchers],
        "nearest": [{"relation": n.relation, **path_record_json(n.record)} for n in e.nearest],
        "fix": e.fix or None,
        "note": e.note or None,
    }


