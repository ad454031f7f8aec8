"""`trustdb log`: show the decisions the kernel took, from the JSON-lines log (the record)."""

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
) -> None:
    """Show the decisions the kernel took (exec, mmap, mprotect, tamper), oldest first."""
    try:
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
