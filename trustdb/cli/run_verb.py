"""`trustdb run` without typer: the verb's work, and a parser for its command line.

The entry point (trustdb.cli.main) tries `parse` before the CLI's imports: typer, rich, click
and every verb module cost about 0.1 s of CPU, against a start-up goal of 0.25 s for the whole
of `trustdb run -- /bin/true` (issue 11). `parse` accepts only the plain forms of the verb's own
options (the typer verb in trustdb.cli.engine_commands declares the same ones, and
tests/cli/test_run_verb.py checks that the two agree); anything else, `--help`, an unknown
option, a missing value, a value that looks like an option, returns None, and the typer app,
which owns every usage message, handles the command line as before.

Standard library and trustdb only: nothing here may import typer.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import NoReturn

from trustdb.cli.exitcodes import RUN_NOT_EXECUTABLE, RUN_NOT_FOUND, ExitCode
from trustdb.db import DEFAULT_DB


def default_db() -> Path:
    """--db's default: $TRUSTDB_DB, else the system database."""
    return Path(os.environ.get("TRUSTDB_DB", str(DEFAULT_DB)))


@dataclass(frozen=True)
class RunArgs:
    """The command line of `trustdb run`, parsed (by typer or by `parse`)."""

    command: list[str]
    audit: bool = False
    backend: str | None = None
    policy: str = "agent"
    allow_read: list[Path] = field(default_factory=list)
    allow_write: list[Path] = field(default_factory=list)
    allow_jit: list[Path] = field(default_factory=list)
    workdir: Path | None = None
    db: Path = field(default_factory=default_db)


GLOBAL_FLAGS = frozenset({"--json", "--quiet", "-q", "--verbose", "-v"})
"""Global options `run` accepts before the verb and ignores (it prints what it prints)."""

FLAG_OPTIONS = {"--audit": "audit"}
VALUE_OPTIONS = {
    "--backend": "backend",
    "--policy": "policy",
    "--allow-read": "allow_read",
    "--read-only": "allow_read",
    "--allow-write": "allow_write",
    "--allow-jit": "allow_jit",
    "--workdir": "workdir",
    "--db": "db",
}
"""Every option of the typer verb, by its flag, as the name of its RunArgs field."""

_REPEATED = frozenset({"allow_read", "allow_write", "allow_jit"})
_PATHS = frozenset({"workdir", "db"})


def _value(args: Sequence[str], i: int, inline: str | None) -> tuple[str, int] | None:
    """An option's value (`--opt=V` or `--opt V`) and the index after it; None if missing or
    if it looks like an option (click would read that differently: let it)."""
    if inline is not None:
        return (inline, i + 1) if inline else None
    if i + 1 >= len(args) or args[i + 1].startswith("-"):
        return None
    return args[i + 1], i + 2


def parse(args: Sequence[str]) -> RunArgs | None:
    """`args` (the command line after the program name) as a `run`, or None when it is not
    one or is not in the plain forms (the typer app then takes it)."""
    values: dict[str, object] = {}
    i = 0
    while i < len(args) and args[i] != "run":  # global options before the verb
        name, eq, inline = args[i].partition("=")
        if name == "--db":
            got = _value(args, i, inline if eq else None)
            if got is None:
                return None
            values["db"], i = Path(got[0]), got[1]
        elif args[i] in GLOBAL_FLAGS:
            i += 1
        else:
            return None
    i += 1
    if i > len(args):
        return None
    lists: dict[str, list[Path]] = {k: [] for k in _REPEATED}
    while i < len(args):
        arg = args[i]
        if arg == "--":
            i += 1
            break
        if not arg.startswith("-") or arg == "-":
            break  # the command: options end here (allow_interspersed_args is off)
        name, eq, inline = arg.partition("=")
        if name in FLAG_OPTIONS and not eq:
            values[FLAG_OPTIONS[name]] = True
            i += 1
            continue
        if name not in VALUE_OPTIONS:
            return None
        got = _value(args, i, inline if eq else None)
        if got is None:
            return None
        key, (text, i) = VALUE_OPTIONS[name], got
        if key in _REPEATED:
            lists[key].append(Path(text))
        else:
            values[key] = Path(text) if key in _PATHS else text
    command = list(args[i:])
    if not command:
        return None
    return RunArgs(command=command, **values, **lists)  # type: ignore[arg-type]


# --- the verb ------------------------------------------------------------------------------


def fail(message: str, code: int = ExitCode.FAILED) -> NoReturn:
    """One line on stderr, then exit non-zero (as trustdb.cli.common.fatal, without typer)."""
    print(f"trustdb: error: {message}", file=sys.stderr)
    raise SystemExit(int(code))


def run_command(a: RunArgs) -> NoReturn:
    """Run the command confined and exit with its status (trustdb.supervisor does the work)."""
    check_command(a.command)
    if os.geteuid() != 0:
        fail("trustdb run needs root (it loads BPF programs)", ExitCode.NO_PERMISSION)
    require_database(a.db)
    check_install()
    from trustdb import supervisor
    from trustdb.abi import Mode
    from trustdb.policy import load as policies
    from trustdb.policy.model import Enforcement

    try:
        chosen = policies.load(a.policy).with_additions(
            read=[str(p.absolute()) for p in a.allow_read],
            write=[str(p.absolute()) for p in a.allow_write],
            jit=[str(p.absolute()) for p in a.allow_jit],
            audit=a.audit,
        )
    except policies.PolicyError as e:
        fail(str(e), ExitCode.USAGE)
    supervisor.reexec_isolated()
    options = supervisor.RunOptions(
        argv=a.command,
        db=a.db,
        mode=Mode.AUDIT if chosen.mode == Enforcement.AUDIT else Mode.ENFORCE,
        backend=a.backend,
        policy=chosen,
        workdir=str((a.workdir or Path.cwd()).absolute()),
    )
    try:
        status = supervisor.run(options)
    except supervisor.SupervisorError as e:
        fail(str(e))
    except KeyboardInterrupt:
        raise SystemExit(130) from None
    raise SystemExit(status)


def require_database(db: Path) -> None:
    """Read verbs: a path with no database is an error (exit 4), never a new database; one
    this user may not read is exit 5."""
    data = db / "data.mdb"
    try:
        os.stat(data)
    except PermissionError:
        fail(f"cannot read {db}: permission denied", ExitCode.NO_PERMISSION)
    except OSError:
        fail(
            f"no trust database at {db} (create one with `trustdb trust` or "
            "`trustdb import`, or name another with --db)",
            ExitCode.NO_DATABASE,
        )
    if not os.access(data, os.R_OK):
        fail(f"cannot read {data}: permission denied", ExitCode.NO_PERMISSION)


def check_install() -> None:
    """The engine's files are part of the install: say which package is missing, in one line,
    before blaming the kernel (libbpf.so.1 itself is reported by trustdb.cli.main)."""
    from trustdb.backends.bpfobject import object_dir

    where = object_dir()
    if not any(where.glob("*.bpf.o")):
        fail(
            f"no BPF objects in {where}: reinstall trustdb (apt install --reinstall trustdb, "
            "or pip install --force-reinstall trustdb), run `make bpf` in a source tree, or set "
            "TRUSTDB_BPF_DIR"
        )


def check_command(argv: Sequence[str]) -> None:
    """Exit 127 (not found) or 126 (found, not executable) like a shell, before any setup."""
    if not argv:
        fail("no command given (usage: trustdb run -- CMD ARGS...)", ExitCode.USAGE)
    name = argv[0]
    if "/" in name:
        candidates = [name]
    else:
        candidates = [os.path.join(d or ".", name)
                      for d in os.environ.get("PATH", os.defpath).split(os.pathsep)]
    found = [c for c in candidates if os.path.exists(c)]
    if any(os.path.isfile(c) and os.access(c, os.X_OK) for c in found):
        return
    if not found:
        fail(f"{name}: command not found", RUN_NOT_FOUND)
    why = "is a directory" if os.path.isdir(found[0]) else "permission denied (not executable)"
    fail(f"{found[0]}: {why}", RUN_NOT_EXECUTABLE)
