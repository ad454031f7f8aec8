"""The exit status of every verb (README: "Exit codes"), in a module without typer: the entry
point's `run` path (trustdb.cli.run_verb) uses them before the CLI's imports."""

from __future__ import annotations

from enum import IntEnum


class ExitCode(IntEnum):
    """The exit status of every verb (README: "Exit codes"). `run` exits with CMD's own
    status instead, or 126, 127, 128+n (see RUN_*)."""

    OK = 0
    """Done; every file asked about is trusted."""
    UNTRUSTED = 1
    """A file is not trusted (check, verify), a command was denied, nothing matched."""
    USAGE = 2
    """Bad options or arguments (click's own code for usage errors)."""
    PARTIAL = 3
    """Imported or trusted, but some files failed verification and were not trusted."""
    NO_DATABASE = 4
    """No trust database at the path given (read verbs never create one)."""
    NO_PERMISSION = 5
    """The database, log or kernel interface is not accessible to this user."""
    BUSY = 6
    """Another writer holds the database."""
    FAILED = 7
    """Any other error: bad input, disk full, the kernel refused, no backend works."""


RUN_NOT_EXECUTABLE = 126
RUN_NOT_FOUND = 127
RUN_SIGNAL_BASE = 128
