"""The `trustdb` command. `main` is the entry point; the typer app and its verbs live in
trustdb.cli.application, imported only after `trustdb.isolation` has decided whether this
process must first re-exec itself isolated (the CLI's imports are most of a start-up: doing them
twice doubled `trustdb run`'s). `run` itself skips them when its command line is plain
(trustdb.cli.run_verb)."""

from __future__ import annotations

import contextlib
import os
import sys
from typing import Any


def main() -> None:
    from trustdb import isolation

    isolation.reexec_if_required(sys.argv)
    try:
        _fast("run")  # `run` in its plain forms: without the CLI's imports (never returns)
        _fast("trust")  # the same for `trust`
        from trustdb.cli.application import app

        app(prog_name="trustdb")
    except ImportError as e:
        # libbpf.so.1 is loaded when an engine verb starts; its absence is one line.
        if e.name != "libbpf.so.1":
            raise
        from trustdb.cli.exitcodes import ExitCode

        print(f"trustdb: error: {e}", file=sys.stderr)
        raise SystemExit(ExitCode.FAILED) from None


def _fast(verb: str) -> None:
    """`trustdb run` or `trustdb trust` straight to its work when its typer-free module
    (trustdb.cli.run_verb, trustdb.cli.trust_verb) understands the whole command line (its
    `parse` returns None for anything else: the typer app answers that, and this returns)."""
    if verb not in sys.argv[1:]:
        return
    # An import statement, not importlib: tests read -X importtime, which sees only these.
    if verb == "run":
        from trustdb.cli import run_verb as module
    else:
        from trustdb.cli import trust_verb as module  # type: ignore[no-redef]
    args = module.parse(sys.argv[1:])
    if args is None:
        return
    try:
        getattr(module, f"{verb}_command")(args)
    except SystemExit as e:
        # Everything the verb set up is torn down already (supervisor.run's cleanup, the
        # trust's workers and database); what interpreter finalization would add is freeing
        # every module object (~13 ms CPU).
        _exit_now(e)
    _exit_now(SystemExit(0))


def _exit_now(e: SystemExit) -> None:
    code = e.code if isinstance(e.code, int) else 0 if e.code is None else 1
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(OSError, ValueError):
            stream.flush()
    os._exit(code)


def __getattr__(name: str) -> Any:
    # `from trustdb.cli import app` (the verb modules, tests): the typer app, built on first use.
    if name == "app":
        from trustdb.cli.application import app

        return app
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
