"""Policy verbs: `policy list`, `policy show NAME|FILE`, `policy check FILE`.

The work lives in trustdb.policy; a bad policy is one `file:line: message` and exit 2.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Annotated, Any

import typer

from trustdb.cli import app
from trustdb.cli.common import GLOBAL, ExitCode, JsonOption, fatal

policy_app = typer.Typer(
    help="Policies: what `trustdb run`, the engine and the service allow (policies/*.toml).",
    no_args_is_help=True,
)
app.add_typer(policy_app, name="policy")


@policy_app.command("list")
def list_policies(as_json: JsonOption = False) -> None:
    """The policies found (NAME and the file it comes from), first match of the search path."""
    from trustdb.policy import load as policy

    found = policy.available()
    if as_json or GLOBAL.json:
        typer.echo(json.dumps({name: str(path) for name, path in found.items()}, indent=2))
        return
    for name, path in found.items():
        try:
            description = policy.load_file(path).description
        except policy.PolicyError as e:
            description = f"INVALID: {e}"
        default = " (default of run)" if name == policy.DEFAULT_POLICY else ""
        typer.echo(f"{name:<12} {path}{default}\n             {description}")


@policy_app.command("show")
def show(
    name: Annotated[str, typer.Argument(metavar="NAME|FILE", help="A policy name or file.")],
    as_json: JsonOption = False,
) -> None:
    """Every setting of a policy, defaults filled in."""
    from trustdb.policy import load as policy

    try:
        chosen = policy.load(name)
    except policy.PolicyError as e:
        fatal(str(e), ExitCode.USAGE)
    data = chosen.to_dict()
    resolved, in_force = _service_modes(chosen)
    if as_json or GLOBAL.json:
        data["service_modes"] = {"resolved": resolved, "in_force": in_force}
        typer.echo(json.dumps(data, indent=2))
        return
    typer.echo(f"policy {chosen.name} ({chosen.source})")
    for section, values in data.items():
        if isinstance(values, dict):
            typer.echo(f"  {section}:")
            for key, value in values.items():
                typer.echo(f"    {key}: {_words(value)}")
        elif section not in ("name", "source"):
            typer.echo(f"  {section}: {_words(values)}")
    typer.echo("  service modes, against this machine's cgroups now:")
    for line in resolved:
        typer.echo(f"    {line}")
    typer.echo("  in force (the running daemon): " + ("; ".join(in_force) if in_force else
                                                        "no daemon is running"))


def _service_modes(chosen: Any) -> tuple[list[str], list[str]]:
    """The policy's [service] modes as the daemon would resolve them now (cgroup paths to
    ids, delegated cgroups refused), and what the running daemon has in force."""
    from trustdb.abi import Mode
    from trustdb.policy.model import Enforcement
    from trustdb.service.modes import resolve
    from trustdb.state import running_engines

    default = Mode.AUDIT if chosen.service.mode == Enforcement.AUDIT else Mode.ENFORCE
    try:
        resolved = resolve(chosen.service, default).lines()
    except OSError as e:
        resolved = [f"cannot read the cgroups: {e}"]
    in_force = [line for s in running_engines() if s.kind == "daemon" for line in s.modes]
    return resolved, in_force


def _words(value: Any) -> str:
    if isinstance(value, list):
        return ", ".join(map(str, value)) if value else "(none)"
    if isinstance(value, dict):
        return ", ".join(f"{k}={v}" for k, v in value.items()) if value else "(none)"
    return str(value)


@policy_app.command("check")
def check(
    files: Annotated[list[Path], typer.Argument(metavar="FILE...", help="Policy files.")],
) -> None:
    """Check policy files: each error as file:line; unknown keys are errors. Exit 2 if any."""
    from trustdb.policy import load as policy

    bad = 0
    for f in files:
        try:
            p = policy.load_file(f)
        except policy.PolicyError as e:
            print(f"trustdb: error: {e}", file=sys.stderr)
            bad += 1
            continue
        if not GLOBAL.quiet:
            typer.echo(f"{f}: ok (policy {p.name})")
    if bad:
        raise typer.Exit(code=int(ExitCode.USAGE))
