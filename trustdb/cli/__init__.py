"""The `trustdb` command: a thin typer app. Each module below registers its verbs on `app`;
the work lives in the pipeline stages, and each verb turns its stage's base error into one line
and an exit code (see common.fatal)."""

from __future__ import annotations

import typer

app = typer.Typer(
    name="trustdb",
    help="Content-addressed allowlist for executable code, enforced in the kernel.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)

# Registration order is the order of --help. Each module adds its commands to `app`.
from trustdb.cli import db_commands  # noqa: E402,F401  trust, untrust, check, list, sources, status, verify
from trustdb.cli import import_commands  # noqa: E402,F401  import rpm|deb|python
from trustdb.cli import engine_commands  # noqa: E402,F401  run, daemon/engine, backends
from trustdb.cli import log_commands  # noqa: E402,F401  log


def main() -> None:
    app()
