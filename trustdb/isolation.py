"""Isolated mode for the verbs that run as the supervisor of a hostile tree (issue 8, route 7).

`trustdb run` must import nothing the confined tree could have written: no PYTHON* variable, no
user site-packages, no current or script directory on the import path. Python's isolated mode
(`-I`) gives exactly that. The installed launchers pass `-I` themselves (packaging/stage.sh: the
.deb and .rpm `/usr/bin/trustdb`), so they start once. Any other start (a pip console script,
`python3 -c 'from trustdb.cli import main; main()'`) re-execs itself under `-I` here, before the
CLI's imports (typer, rich, pydantic: about 0.1 s), so the second start costs one bare
interpreter and not the whole CLI twice. Standard library only, and nothing from trustdb but
this module and the package's `__init__`: what runs before the re-exec is what a non-isolated
interpreter had already run anyway (site, .pth files), plus these few lines.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Sequence
from pathlib import Path

ISOLATED_VERBS = frozenset({"run"})
"""Verbs whose process must be isolated (the supervisor of `run`)."""

_VALUE_OPTIONS = frozenset({"--db"})
"""Global options that take a value as the next argument (the verb is not it)."""

_BOOT = ("import sys; sys.path.insert(0, sys.argv.pop(1)); sys.argv[0] = 'trustdb'; "
         "from trustdb.cli import main; main()")


def verb_of(args: Sequence[str]) -> str | None:
    """The verb of a `trustdb` command line (its arguments after the program name): the first
    word that is neither an option nor a global option's value."""
    skip = False
    for arg in args:
        if skip:
            skip = False
        elif arg == "--":
            return None
        elif arg.startswith("-"):
            skip = arg in _VALUE_OPTIONS
        else:
            return arg
    return None


def package_root() -> str:
    """The directory trustdb is imported from (read-only inside a run, like site-packages)."""
    return str(Path(__file__).resolve().parents[1])


def reexec_if_required(argv: Sequence[str]) -> None:
    """Re-exec this command under `python -I` when its verb must run isolated and it does not
    yet. Keeps the pid (the run's cgroup name and a caller's pid stay right). Only the root
    trustdb itself was imported from is put back on the new interpreter's path."""
    if sys.flags.isolated or verb_of(argv[1:]) not in ISOLATED_VERBS:
        return
    reexec_isolated(argv)


def reexec_isolated(argv: Sequence[str]) -> None:
    """Re-exec under `python -I` unless already isolated (whatever the verb)."""
    if sys.flags.isolated:
        return
    sys.stdout.flush()
    sys.stderr.flush()
    os.execv(sys.executable, [sys.executable, "-I", "-c", _BOOT, package_root(), *argv[1:]])
