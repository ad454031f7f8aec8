"""`trustdb run`'s typer-free path (trustdb.cli.run_verb): it must read every command line it
accepts exactly as the typer verb does, decline everything else, and import no typer."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import typer.main
from typer.testing import CliRunner

from trustdb.cli import app, run_verb

REPO = Path(__file__).resolve().parents[2]

AGREED = [
    ["run", "--", "/bin/true"],
    ["run", "/bin/echo", "-n", "--audit"],
    ["run", "--audit", "--policy", "strict", "--", "ls", "-l"],
    ["--db", "/x/db", "run", "--", "true"],
    ["--db=/x/db", "-q", "run", "--db", "/y/db", "true"],
    ["--json", "--verbose", "run", "--backend=tracepoint", "--", "true"],
    ["run", "--allow-read", "a", "--read-only=b", "--allow-write", "/w", "--allow-jit", "node",
     "--allow-read", "c", "--workdir", "/tmp", "--", "node", "x.js"],
    ["run", "--", "--looks-like-an-option"],
    ["run", "--", "cmd", "--", "more"],
]

DECLINED = [
    ["run"],
    ["run", "--"],
    ["run", "--help"],
    ["run", "-h", "--", "true"],
    ["--help", "run", "--", "true"],
    ["-V", "run", "--", "true"],
    ["run", "--no-such-option", "--", "true"],
    ["run", "--policy"],
    ["run", "--policy", "--audit", "--", "true"],
    ["run", "--policy=", "--", "true"],
    ["run", "--audit=yes", "--", "true"],
    ["-qv", "run", "--", "true"],
    ["--db", "run", "--", "true"],
    ["status"],
    ["trust", "run"],
]


def typer_args(argv: list[str], monkeypatch: pytest.MonkeyPatch) -> run_verb.RunArgs:
    """What the typer verb hands to run_command for `argv`."""
    got: list[run_verb.RunArgs] = []

    def capture(a: run_verb.RunArgs) -> None:
        got.append(a)
        raise SystemExit(0)

    monkeypatch.setattr(run_verb, "run_command", capture)
    result = CliRunner().invoke(app, argv)
    assert got, f"typer did not reach run_command: {result.output}"
    return got[0]


@pytest.mark.parametrize("argv", AGREED, ids=" ".join)
def test_parse_reads_what_typer_reads(argv: list[str], monkeypatch: pytest.MonkeyPatch) -> None:
    fast = run_verb.parse(argv)
    assert fast is not None
    assert fast == typer_args(argv, monkeypatch)


@pytest.mark.parametrize("argv", DECLINED, ids=" ".join)
def test_parse_leaves_the_rest_to_typer(argv: list[str]) -> None:
    assert run_verb.parse(argv) is None


def test_every_option_of_the_typer_verb_is_known() -> None:
    group = typer.main.get_command(app)
    run = group.commands["run"]  # type: ignore[attr-defined]
    flags: set[str] = set()
    values: set[str] = set()
    for p in run.params:
        if getattr(p, "param_type_name", "") != "option":
            continue
        (flags if p.is_flag else values).update(o for o in p.opts if o.startswith("--"))
    assert flags == set(run_verb.FLAG_OPTIONS)
    assert values == set(run_verb.VALUE_OPTIONS)


def test_the_fast_path_imports_no_typer(tmp_path: Path) -> None:
    """A plain `run` reaches its checks (here: command not found, exit 127) without typer."""
    code = ("import sys; sys.path.insert(0, sys.argv.pop(1)); sys.argv[0] = 'trustdb'; "
            "from trustdb.cli import main; main()")
    r = subprocess.run([sys.executable, "-X", "importtime", "-I", "-c", code, str(REPO), "run",
                        "--", str(tmp_path / "missing")], capture_output=True, text=True,
                       check=False)
    assert r.returncode == 127, r.stderr
    assert "command not found" in r.stderr
    imported = [ln.rsplit("|", 1)[-1].strip() for ln in r.stderr.splitlines()
                if ln.startswith("import time:")]
    assert "trustdb.cli.run_verb" in imported
    assert not [m for m in imported if m.split(".")[0] in ("typer", "rich", "click")]
