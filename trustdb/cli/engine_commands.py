"""Engine verbs: `run` (confine one command), `daemon` (system-wide service), `backends`.

Each verb parses its options and calls one function (trustdb.supervisor, daemon, state); the
stage errors become one line and an exit code (common.fatal, common.ExitCode). `run` exits with
CMD's status, 126 when CMD is not executable, 127 when it is not found, 128+N when a signal
killed it.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from trustdb.abi import Mode
from trustdb.cli import app, db_commands, run_verb
from trustdb.cli.common import (
    DEFAULT_DB_PATH,
    DbOption,
    ExitCode,
    JsonOption,
    fatal,
)

# trustdb.supervisor is imported inside each verb: it pulls in libbpf, which the other verbs
# (and `--help`) must not need.

BackendOption = Annotated[
    str | None,
    typer.Option(
        "--backend",
        help="Enforcement backend (see `trustdb backends`); default: the strongest this kernel "
        "accepts.",
        show_default=False,
    ),
]


@app.command(
    context_settings={"allow_interspersed_args": False},
    no_args_is_help=True,
)
def run(
    command: Annotated[
        list[str],
        typer.Argument(metavar="-- CMD [ARGS]...", help="The command to run confined."),
    ],
    audit: Annotated[
        bool, typer.Option("--audit", help="Log and report what would be denied; deny nothing.")
    ] = False,
    backend: BackendOption = None,
    policy_name: Annotated[
        str,
        typer.Option("--policy", help="Policy NAME (`trustdb policy list`) or FILE.",
                     show_default=True),
    ] = "agent",
    allow_read: Annotated[
        list[Path] | None,
        typer.Option("--allow-read", "--read-only",
                     help="Another path the command may read but not change."),
    ] = None,
    allow_write: Annotated[
        list[Path] | None,
        typer.Option("--allow-write", help="Another path the command may read and change."),
    ] = None,
    allow_jit: Annotated[
        list[Path] | None,
        typer.Option("--allow-jit",
                     help="A trusted program that may use anonymous executable memory (node)."),
    ] = None,
    workdir: Annotated[
        Path | None,
        typer.Option("--workdir", help="$WORKDIR of the policy (default: the current directory)."),
    ] = None,
    db: DbOption = DEFAULT_DB_PATH,
) -> None:
    """Run CMD in a fresh cgroup, confined to the trust database and a policy; exit with CMD's
    status.

    The policy (default: agent) says what CMD may read, write and connect to, which JITs may
    have executable memory, and whether denials are enforced. The confined tree cannot switch
    any of it off, even as root: it runs in its own PID and mount namespaces (the supervisor is
    invisible, the database and /sys/fs/bpf are covered), under Landlock and a seccomp filter
    (no bpf(), mount, ptrace, module loading, new namespaces, clock changes), and the BPF mark
    follows every descendant wherever it moves. If trustdb dies, the tree dies.
    """
    run_verb.run_command(run_verb.RunArgs(
        command=command, audit=audit, backend=backend, policy=policy_name,
        allow_read=list(allow_read or ()), allow_write=list(allow_write or ()),
        allow_jit=list(allow_jit or ()), workdir=workdir, db=db))


@app.command()
def daemon(
    mode: Annotated[
        str | None, typer.Option("--mode", help="enforce: deny untrusted code; audit: only log "
                                 "it. The default for every task (default: the policy's "
                                 "[service] mode, else enforce).")
    ] = None,
    backend: BackendOption = None,
    db: DbOption = DEFAULT_DB_PATH,
    policy: Annotated[
        str | None,
        typer.Option("--policy", help="A policy name or file; the service uses its "
                     "[compilers] trust_outputs (e.g. workstation: what cc/ld build may run) "
                     "and its [service] per-uid and per-cgroup modes (re-read on SIGHUP)."),
    ] = None,
) -> None:
    """Enforce system-wide until stopped (what packaging/trustdb.service runs).

    Only ever started by a person or by the service unit: nothing else in trustdb enforces
    outside a cgroup it created.
    """
    from trustdb import daemon as service
    from trustdb.session import SupervisorError

    if mode not in ("enforce", "audit", None):
        fatal(f"--mode must be enforce or audit, not {mode!r}", ExitCode.USAGE)
    try:
        status = service.daemon(
            db=db, mode=None if mode is None else Mode.ENFORCE if mode == "enforce" else
            Mode.AUDIT, backend=backend, policy=policy)
    except SupervisorError as e:
        fatal(str(e))
    raise typer.Exit(code=status)


@app.command()
def backends(as_json: JsonOption = False) -> None:
    """List the enforcement backends, strongest first, with what this kernel says of each."""
    import json

    from trustdb import state

    run_verb.check_install()
    rows = state.probe_backends()
    if as_json:
        typer.echo(json.dumps([r.to_dict() for r in rows], indent=2))
        return
    for r in rows:
        mark = "*" if r.selected else " "
        word = "ok" if r.ok else "unavailable"
        typer.echo(f"{mark} {r.name:<11} {word:<12} {r.reason}")
        for hole in r.holes:
            typer.echo(f"    hole {hole}")
    if not any(r.selected for r in rows):
        fatal("no backend works on this kernel")


def engine_status() -> dict[str, object]:
    """`trustdb status` fields: each engine running now (daemon, runs) with its backend, and the
    backend this kernel gives a new engine (schemas/status.json)."""
    from trustdb import state

    chosen = next((r for r in state.probe_backends(remembered=True) if r.selected), None)
    return {"engines": [s.to_dict() for s in state.running_engines()],
            "backend": chosen.name if chosen else None}


db_commands.STATUS_EXTRAS.append(engine_status)
