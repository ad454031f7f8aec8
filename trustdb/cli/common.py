"""What every CLI verb shares: the database option and the one way to fail."""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Annotated, NoReturn

import typer

from trustdb.db import DEFAULT_DB

DbOption = Annotated[
    Path,
    typer.Option(
        "--db",
        envvar="TRUSTDB_DB",
        help="Trust database directory.",
        show_default=True,
    ),
]
DEFAULT_DB_PATH = Path(os.environ.get("TRUSTDB_DB", str(DEFAULT_DB)))

JsonOption = Annotated[bool, typer.Option("--json", help="Machine-readable output.")]


def fatal(message: str, code: int = 1) -> NoReturn:
    """One line on stderr, then exit non-zero (pip-audit's _fatal)."""
    print(f"trustdb: error: {message}", file=sys.stderr)
    raise typer.Exit(code=code)
