"""`trustdb log`: show the decisions the kernel took, from the JSON-lines log (the record) or,
with --journal, from the systemd journal (the service sends each decision there with
structured TRUSTDB_* fields and a MESSAGE_ID per kind of decision); filtered by
trustdb.eventfilter, which does not care where the records come from."""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Annotated

import typer

from trustdb.cli import app
from trustdb.cli.common import ExitCode, JsonOption, fatal
from trustdb.eventfilter import DecisionFilter, parse_time
from trustdb.events import (
    DEFAULT_LOG,
    LOG_ENV,
    Decision,
    follow_lines,
    parse_json_line,
    render_text,
)

LogFileOption = Annotated[
    Path,
    typer.Option(
        "--file",
        metavar="FILE",
        readable=False,  # a permission error is one line and exit 5, not a usage error
        envvar=LOG_ENV,
        help="Decision log (JSON lines) to read.",
        show_default=True,
    ),
]
TimeOption = Annotated[
    str | None,
    typer.Option(metavar="TIME", show_default=False,
                 help="ISO-8601 time (2026-12-01T20:00:00Z) or an age (10m, 2h, 1d)."),
]


@app.command("log")
def log_command(
    follow: Annotated[
        bool, typer.Option("--follow", "-f", help="Keep printing decisions as they arrive.")
    ] = False,
    since: TimeOption = None,
    until: TimeOption = None,
    denied: Annotated[
        bool, typer.Option("--denied", help="Only denials (and what audit would deny).")
    ] = False,
    path: Annotated[
        str | None,
        typer.Option(metavar="PATH", show_default=False,
                     help="The file decided on: a path or a shell pattern ('/tmp/*')."),
    ] = None,
    pid: Annotated[
        int | None,
        typer.Option(metavar="PID", show_default=False, help="A process (pid or tgid)."),
    ] = None,
    exe: Annotated[
        str | None,
        typer.Option(metavar="PATH", show_default=False,
                     help="The program that asked: a path or a shell pattern."),
    ] = None,
    hook: Annotated[
        str | None,
        typer.Option(metavar="HOOK", show_default=False, help="exec, mmap, mprotect or tamper."),
    ] = None,
    json_out: JsonOption = False,
    file: LogFileOption = DEFAULT_LOG,
    journal: Annotated[
        bool, typer.Option("--journal", help="Read the service's decisions from the systemd "
                           "journal (journalctl) instead of the file.")
    ] = False,
) -> None:
    """Show the decisions the kernel took (exec, mmap, mprotect, tamper), oldest first.

    Filters combine: `trustdb log --denied --since 1h --exe '/usr/bin/*'`. `trustdb why
    event:N` explains record N (as numbered by `trustdb log`)."""
    if hook is not None and hook.lower() not in ("exec", "mmap", "mprotect", "tamper"):
        fatal(f"--hook must be exec, mmap, mprotect or tamper, not {hook!r}", ExitCode.USAGE)
    try:
        wanted = DecisionFilter(
            since=parse_time(since) if since else None,
            until=parse_time(until) if until else None,
            denied=denied, path=path, pid=pid, exe=exe, hook=hook,
        )
    except ValueError as e:
        fatal(str(e), ExitCode.USAGE)
    try:
        records = (_journal_decisions(follow=follow) if journal
                   else (d for _, d in read_decisions(file, follow=follow)))
        for decision in records:
            if not wanted.matches(decision):
                continue
            out = json.dumps(decision.to_dict()) if json_out else render_text(decision)
            print(out.encode("utf-8", "backslashreplace").decode("utf-8"), flush=follow)
    except FileNotFoundError:
        fatal(f"no decision log at {file} (set --file or {LOG_ENV})", ExitCode.NO_DATABASE)
    except PermissionError:
        fatal(f"cannot read {file}: permission denied (the log is readable by root)",
              ExitCode.NO_PERMISSION)
    except KeyboardInterrupt:
        raise typer.Exit(130) from None
    except BrokenPipeError:
        # `trustdb log | head`: the reader left; stop quietly, without a traceback at exit.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        raise typer.Exit(0) from None


def read_decisions(path: Path, *, follow: bool = False) -> Iterator[tuple[int, Decision]]:
    """(record number, decision) for each record of the log; bad records are a warning."""
    for number, line in enumerate(follow_lines(path, follow=follow), start=1):
        try:
            yield number, parse_json_line(line)
        except ValueError as e:
            print(f"trustdb: warning: {path}: record {number} skipped: {e}", file=sys.stderr)


def _journal_decisions(*, follow: bool) -> Iterator[Decision]:
    """The service's decisions from journalctl (other trustdb messages are skipped)."""
    import shutil
    import subprocess

    from trustdb.events import from_journal

    if shutil.which("journalctl") is None:
        fatal("journalctl not found: read the file log instead (--file)")
    cmd = ["journalctl", "--no-pager", "-o", "json", "SYSLOG_IDENTIFIER=trustdb"]
    with subprocess.Popen([*cmd, *(["-f"] if follow else [])], stdout=subprocess.PIPE,
                          text=True) as proc:
        assert proc.stdout is not None
        for line in proc.stdout:
            try:
                yield from_journal(json.loads(line))
            except ValueError:
                continue  # another trustdb message (start-up, revocations)
