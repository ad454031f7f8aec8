"""`trustdb log`: show the decisions the kernel took, from the JSON-lines log (the record) or,
with --journal, from the systemd journal (the service sends each decision there with
structured TRUSTDB_* fields and a MESSAGE_ID per kind of decision)."""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Annotated

import typer

from trustdb.cli import app
from trustdb.cli.common import ExitCode, JsonOption, fatal
from trustdb.events import DEFAULT_LOG, LOG_ENV, follow_lines, parse_json_line, render_text

LogFileOption = Annotated[
    Path,
    typer.Option(
        "--file",
        envvar=LOG_ENV,
        help="Decision log (JSON lines) to read.",
        show_default=True,
    ),
]


@app.command("log")
def log_command(
    follow: Annotated[
        bool, typer.Option("--follow", "-f", help="Keep printing decisions as they arrive.")
    ] = False,
    json_out: JsonOption = False,
    file: LogFileOption = DEFAULT_LOG,
    journal: Annotated[
        bool, typer.Option("--journal", help="Read the service's decisions from the systemd "
                           "journal (journalctl) instead of the file.")
    ] = False,
) -> None:
    """Show the decisions the kernel took (exec, mmap, mprotect, tamper), oldest first."""
    try:
        if journal:
            _show_journal(follow=follow, json_out=json_out)
            return
        _show(file, follow=follow, json_out=json_out)
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


def _show(path: Path, *, follow: bool, json_out: bool) -> None:
    for number, line in enumerate(follow_lines(path, follow=follow), start=1):
        try:
            decision = parse_json_line(line)
        except ValueError as e:
            print(f"trustdb: warning: {path}: record {number} skipped: {e}", file=sys.stderr)
            continue
        out = line if json_out else render_text(decision)
        print(out.encode("utf-8", "backslashreplace").decode("utf-8"), flush=follow)


def _show_journal(*, follow: bool, json_out: bool) -> None:
    import json
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
                decision = from_journal(json.loads(line))
            except ValueError:
                continue  # another trustdb message (start-up, revocations)
            out = json.dumps(decision.to_dict()) if json_out else render_text(decision)
            print(out, flush=follow)
