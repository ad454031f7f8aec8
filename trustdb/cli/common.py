"""What every CLI verb shares: the exit codes, the global options, the database option and the
one way to fail.

Global options (--db, --json, --quiet, --verbose) are accepted before the verb
(`trustdb --db X status`) and after it (`trustdb status --db X`). The root callback stores the
ones given before the verb as click's default_map for every verb that has the same option, so
each verb still reads its own parameter; a value given after the verb wins.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, NoReturn

import typer

from trustdb.cli.exitcodes import (  # noqa: F401  re-exported for the verb modules
    RUN_NOT_EXECUTABLE,
    RUN_NOT_FOUND,
    RUN_SIGNAL_BASE,
    ExitCode,
)
from trustdb.cli.run_verb import default_db, require_database  # noqa: F401  (typer-free)
from trustdb.cli.trust_verb import (  # noqa: F401  (typer-free)
    database_error_code,
    prepare_new_database,
)


@dataclass(slots=True)
class GlobalOptions:
    """Options given before the verb (None: not given there)."""

    db: Path | None = None
    json: bool = False
    quiet: bool = False
    verbose: bool = False


GLOBAL = GlobalOptions()
"""Set by the root callback at each invocation (trustdb.cli.root)."""

DEFAULT_DB_PATH = default_db()

DbOption = Annotated[
    Path,
    typer.Option(
        "--db",
        metavar="DIR",
        readable=False,  # checked by require_database: one line, exit 5, not a usage error
        help="Trust database directory (also TRUSTDB_DB).",
        show_default=True,
    ),
]
JsonOption = Annotated[
    bool, typer.Option("--json", help="Machine-readable output (schemas/ in the source tree).")
]
QuietOption = Annotated[
    bool, typer.Option("--quiet", "-q", help="Print only problems and errors.")
]
VerboseOption = Annotated[
    bool, typer.Option("--verbose", "-v", help="Also list skipped files and other details.")
]

_GLOBAL_FLAGS = {"--db": "db", "--json": "json", "--quiet": "quiet", "--verbose": "verbose"}


def push_global_defaults(ctx: typer.Context, options: GlobalOptions) -> None:
    """Make the global options the defaults of every verb's own --db/--json/--quiet/--verbose
    (click looks options up in ctx.default_map, by parameter name, per subcommand).

    Duck-typed on click's Group/Option: typer 0.2x carries its own copy of click."""
    given = {flag: getattr(options, attr) for flag, attr in _GLOBAL_FLAGS.items()}
    given = {flag: v for flag, v in given.items() if v not in (None, False)}
    if given and hasattr(ctx.command, "list_commands"):
        ctx.default_map = _defaults_for(ctx, ctx.command, given)


def _defaults_for(ctx: typer.Context, group: Any, given: dict[str, Any]) -> dict[str, Any]:
    tree: dict[str, Any] = {}
    for name in group.list_commands(ctx):
        cmd = group.get_command(ctx, name)
        if cmd is None:
            continue
        if hasattr(cmd, "list_commands"):
            tree[name] = _defaults_for(ctx, cmd, given)
            continue
        tree[name] = {
            p.name: given[opt]
            for p in cmd.params
            if getattr(p, "param_type_name", "") == "option" and p.name
            for opt in p.opts
            if opt in given
        }
    return tree


def fatal(message: str, code: int = ExitCode.FAILED) -> NoReturn:
    """One line on stderr, then exit non-zero (pip-audit's _fatal)."""
    print(f"trustdb: error: {message}", file=sys.stderr)
    raise typer.Exit(code=int(code))
