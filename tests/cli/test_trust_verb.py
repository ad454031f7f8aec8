"""`trustdb trust`'s typer-free path (trustdb.cli.trust_verb): it must read every command line
it accepts exactly as the typer verb does, decline everything else, and import no typer."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import typer.main
from typer.testing import CliRunner

from trustdb.cli import app, trust_verb

REPO = Path(__file__).resolve().parents[2]

AGREED = [
    ["trust", "/usr/bin"],
    ["trust", "--all-files", "/a", "/b"],
    ["trust", "/a", "--all-files", "--source", "tools", "/b"],
    ["trust", "-s", "tools", "-q", "--json", "--db", "/x/db", "/a"],
    ["trust", "--source=dir:/a", "--db=/x/db", "/a"],
    ["trust", "--db", "/x/db", "--db", "/y/db", "--quiet", "/a"],
    ["trust", "relative/dir", "file with spaces"],
]

DECLINED = [
    ["trust"],
    ["trust", "--all-files"],
    ["trust", "--help"],
    ["trust", "-h", "/a"],
    ["-q", "trust", "/a"],
    ["--db", "/x", "trust", "/a"],
    ["trust", "--", "-a"],
    ["trust", "-"],
    ["trust", "--no-such-option", "/a"],
    ["trust", "--source"],
    ["trust", "--source", "--all-files", "/a"],
    ["trust", "--source=", "/a"],
    ["trust", "--all-files=yes", "/a"],
    ["trust", "-qs", "x", "/a"],
    ["trust", "-sx", "/a"],
    ["trust", "-s=x", "/a"],
    ["untrust", "/a"],
    ["run", "trust"],
]


def typer_args(argv: list[str], monkeypatch: pytest.MonkeyPatch) -> trust_verb.TrustArgs:
    """What the typer verb hands to trust_command for `argv`."""
    got: list[trust_verb.TrustArgs] = []

    def capture(a: trust_verb.TrustArgs) -> None:
        got.append(a)

    from trustdb.cli import db_commands

    monkeypatch.setattr(db_commands, "trust_command", capture)
    result = CliRunner().invoke(app, argv)
    assert got, f"typer did not reach trust_command: {result.output}"
    return got[0]


@pytest.mark.parametrize("argv", AGREED, ids=" ".join)
def test_parse_reads_what_typer_reads(argv: list[str], monkeypatch: pytest.MonkeyPatch) -> None:
    fast = trust_verb.parse(argv)
    assert fast is not None
    assert fast == typer_args(argv, monkeypatch)


@pytest.mark.parametrize("argv", DECLINED, ids=" ".join)
def test_parse_leaves_the_rest_to_typer(argv: list[str]) -> None:
    assert trust_verb.parse(argv) is None


def test_every_option_of_the_typer_verb_is_known() -> None:
    group = typer.main.get_command(app)
    trust = group.commands["trust"]  # type: ignore[attr-defined]
    flags: set[str] = set()
    values: set[str] = set()
    for p in trust.params:
        if getattr(p, "param_type_name", "") != "option":
            continue
        (flags if p.is_flag else values).update(p.opts)
    assert flags == set(trust_verb.FLAG_OPTIONS)
    assert values == set(trust_verb.VALUE_OPTIONS)


def _trustdb(*args: str, importtime: bool = False) -> subprocess.CompletedProcess[str]:
    code = ("import sys; sys.path.insert(0, sys.argv.pop(1)); sys.argv[0] = 'trustdb'; "
            "from trustdb.cli import main; main()")
    flags = ["-X", "importtime"] if importtime else []
    return subprocess.run([sys.executable, *flags, "-I", "-c", code, str(REPO), *args],
                          capture_output=True, text=True, check=False)


def test_the_fast_path_imports_no_typer_and_records(tmp_path: Path) -> None:
    """A plain `trust` does the whole verb (here: a problem file, exit 3) without typer, and
    records what the typer verb records."""
    tree = tmp_path / "tree"
    tree.mkdir()
    (tree / "tool").write_bytes(b"#!/bin/sh\necho hi\n")
    (tree / "tool").chmod(0o755)
    (tree / "notes.txt").write_text("not code\n")
    (tree / "gone").symlink_to(tree / "nowhere")
    r = _trustdb("trust", "--db", str(tmp_path / "db"), str(tree), str(tmp_path / "missing"),
                 importtime=True)
    assert r.returncode == 3, r.stderr
    assert f"trustdb: {tmp_path / 'missing'}: no such file" in r.stderr
    imported = [ln.rsplit("|", 1)[-1].strip() for ln in r.stderr.splitlines()
                if ln.startswith("import time:")]
    assert "trustdb.cli.trust_verb" in imported
    assert not [m for m in imported if m.split(".")[0] in ("typer", "rich", "click")]
    fast = _trustdb("trust", "--json", "--db", str(tmp_path / "db"), str(tree))
    slow = _trustdb("--json", "trust", "--db", str(tmp_path / "db2"), str(tree))  # typer's
    assert fast.returncode == slow.returncode == 0, fast.stderr + slow.stderr
    a, b = json.loads(fast.stdout), json.loads(slow.stdout)
    assert a.pop("database") != b.pop("database")
    assert a.pop("generation") == 2 and b.pop("generation") == 1  # the first run made one
    assert a == b
    assert a["source"] == f"dir:{tree}" and a["recorded"] == 1 and a["added"] == 1
