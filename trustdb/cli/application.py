"""The typer app of the `trustdb` command (its entry point, trustdb.cli.main, imports this module
once it knows the process runs isolated where it must). Each module imported at the end
registers its verbs on `app`; the work lives in the pipeline stages, and each verb turns its
stage's base error into one line and an exit code (common.ExitCode, common.fatal)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from trustdb import __version__
from trustdb.cli import helptext, plainparams
from trustdb.cli.common import GLOBAL, GlobalOptions, push_global_defaults

helptext.install()
plainparams.install()

app = typer.Typer(
    name="trustdb",
    help="Content-addressed allowlist for executable code, enforced in the kernel.\n\n"
    "Exit status: 0 ok or trusted; 1 untrusted or denied; 2 usage; 3 partial import; "
    "4 no database; 5 no permission; 6 database busy; 7 other error. "
    "`run` exits with the command's status (126 not executable, 127 not found, 128+N signal).",
    no_args_is_help=True,
    add_completion=True,
    pretty_exceptions_enable=False,
    rich_markup_mode="markdown",  # docstring paragraphs are re-flowed, `code` is shown as code
    context_settings={"help_option_names": ["-h", "--help"]},
)


def _show_version(value: bool) -> None:
    if value:
        typer.echo(f"trustdb {__version__}")
        raise typer.Exit()


@app.callback()
def root(
    ctx: typer.Context,
    db: Annotated[
        Path | None,
        typer.Option(
            "--db", metavar="DIR", show_default=False, readable=False,
            help="Trust database directory, for every verb (default: TRUSTDB_DB or "
            "/var/lib/trustdb).",
        ),
    ] = None,
    json_output: Annotated[
        bool, typer.Option("--json", help="Machine-readable output, for every verb.")
    ] = False,
    quiet: Annotated[
        bool, typer.Option("--quiet", "-q", help="Print only problems and errors.")
    ] = False,
    verbose: Annotated[
        bool, typer.Option("--verbose", "-v", help="Also list skipped files and details.")
    ] = False,
    version: Annotated[
        bool,
        typer.Option("--version", "-V", callback=_show_version, is_eager=True,
                     help="Print the version and exit."),
    ] = False,
) -> None:
    """Global options go before or after the verb: `trustdb --db X status` is
    `trustdb status --db X`."""
    options = GlobalOptions(db=db, json=json_output, quiet=quiet, verbose=verbose)
    GLOBAL.db, GLOBAL.json, GLOBAL.quiet, GLOBAL.verbose = (
        options.db, options.json, options.quiet, options.verbose
    )
    push_global_defaults(ctx, options)


# Registration order is the order of --help. Each module adds its commands to `app`.
from trustdb.cli import (
    db_commands,  # noqa: F401  trust, untrust, check, list, sources, status, verify
    engine_commands,  # noqa: F401  run, daemon/engine, backends
    import_commands,  # noqa: F401  import rpm|deb|python
    log_commands,  # noqa: F401  log
    policy_commands,  # noqa: F401  policy list|show|check
    service_commands,  # noqa: F401  service stop|preflight|status|audit-summary
    why_commands,  # noqa: F401  why
)

