"""The `trustdb` command. `main` is the entry point; the typer app and its verbs live in
trustdb.cli.application, imported only after `trustdb.isolation` has decided whether this
process must first re-exec itself isolated (the CLI's imports are most of a start-up: doing them
twice doubled `trustdb run`'s)."""

from __future__ import annotations

import sys
from typing import Any


def main() -> None:
    from trustdb import isolation

    isolation.reexec_if_required(sys.argv)
    from trustdb.cli.application import app
    from trustdb.cli.common import ExitCode

    try:
        app(prog_name="trustdb")
    except ImportError as e:
        # libbpf.so.1 is loaded when an engine verb starts; its absence is one line.
        if e.name != "libbpf.so.1":
            raise
        print(f"trustdb: error: {e}", file=sys.stderr)
        raise SystemExit(ExitCode.FAILED) from None


def __getattr__(name: str) -> Any:
    # `from trustdb.cli import app` (the verb modules, tests): the typer app, built on first use.
    if name == "app":
        from trustdb.cli.application import app

        return app
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
