"""Every --json output has a JSON Schema in schemas/, and real output of every verb validates
against it (jsonschema, draft 2020-12, formats checked: date-time is ISO-8601)."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import jsonschema
import pytest
import typer

from tests.conftest import REPO
from tests.test_cli_db import project, run

SCHEMAS = REPO / "schemas"
SCHEMA_OF = {"import deb": "import", "import rpm": "import", "import python": "import",
             "service trust-self": "import"}
"""Verbs that share one schema; every other verb's schema is schemas/<verb>.json, with a dash
for a space (`policy show` -> schemas/policy-show.json)."""


def schema_name(verb: str) -> str:
    return SCHEMA_OF.get(verb, verb.replace(" ", "-"))


def schema(name: str) -> dict[str, Any]:
    return json.loads((SCHEMAS / f"{name}.json").read_text())


def validate(name: str, document: Any) -> None:
    # date-time is only checked when rfc3339-validator is installed (the test extras have it).
    assert not jsonschema.Draft202012Validator.FORMAT_CHECKER.conforms("yesterday", "date-time")
    s = schema(name)
    jsonschema.Draft202012Validator.check_schema(s)
    jsonschema.Draft202012Validator(
        s, format_checker=jsonschema.Draft202012Validator.FORMAT_CHECKER
    ).validate(document)


def verbs_with_json() -> list[str]:
    from trustdb.cli import app

    found: list[str] = []

    def walk(cmd: Any, prefix: str) -> None:
        for name in getattr(cmd, "commands", {}):
            sub = cmd.commands[name]
            full = f"{prefix} {name}".strip()
            if hasattr(sub, "commands"):
                walk(sub, full)
            elif any("--json" in getattr(p, "opts", ()) for p in sub.params):
                found.append(full)

    walk(typer.main.get_command(app), "")
    return found


def test_every_json_verb_has_a_schema() -> None:
    verbs = verbs_with_json()
    assert {"check", "list", "status", "import deb"} <= set(verbs)
    missing = [v for v in verbs if not (SCHEMAS / f"{schema_name(v)}.json").is_file()]
    assert missing == [], f"--json verbs without schemas/<verb>.json: {missing}"
    for path in SCHEMAS.glob("*.json"):
        jsonschema.Draft202012Validator.check_schema(json.loads(path.read_text()))


def test_db_verbs_output_validates(tmp_path: Path, cli_env: dict[str, str]) -> None:
    root = project(tmp_path / "proj")
    out = run(cli_env, "trust", "--json", str(root), str(tmp_path / "gone"))
    validate("trust", json.loads(out.stdout))
    for verb, args in (("check", [str(root / "bin" / "tool"), "/bin/sh"]), ("list", []),
                       ("sources", []), ("status", []), ("verify", [])):
        out = run(cli_env, verb, "--json", *args)
        assert out.stdout, (verb, out.stderr)
        validate(verb, json.loads(out.stdout))
    out = run(cli_env, "untrust", "--json", str(root))
    validate("untrust", json.loads(out.stdout))


@pytest.mark.slow
def test_import_output_validates(tmp_path: Path, cli_env: dict[str, str]) -> None:
    venv = Path(os.path.dirname(os.path.dirname(os.path.realpath(__file__))))  # any dir works
    out = run(cli_env, "import", "python", "--json", str(venv))
    validate("import", json.loads(out.stdout))
    if os.path.exists("/var/lib/dpkg/status"):
        out = run(cli_env, "import", "deb", "--json")
        validate("import", json.loads(out.stdout))


def test_log_records_validate(tmp_path: Path, cli_env: dict[str, str]) -> None:
    from trustdb.events import JsonLinesSerializer, parse_json_line

    line = (
        '{"time":"2026-12-01T20:00:00.000000Z","verdict":"deny","hook":"exec","reason":'
        '"not in the trust database","path":"/tmp/x","dev":"0:42","ino":7,"pid":5,"tgid":5,'
        '"ppid":1,"uid":0,"comm":"x","exe":"/tmp/x","mode":"enforce","backend":"tracepoint"}'
    )
    log = tmp_path / "decisions.jsonl"
    log.write_bytes(JsonLinesSerializer().serialize(parse_json_line(line)))
    out = run(cli_env, "log", "--json", "--file", str(log))
    assert out.returncode == 0, out.stderr
    for record in out.stdout.splitlines():
        validate("log", json.loads(record))


@pytest.mark.root
@pytest.mark.bpf
def test_backends_output_validates(cli_env: dict[str, str], as_root: None) -> None:
    out = run(cli_env, "backends", "--json")
    validate("backends", json.loads(out.stdout))


def test_policy_output_validates(cli_env: dict[str, str]) -> None:
    listed = json.loads(run(cli_env, "policy", "list", "--json").stdout)
    validate("policy-list", listed)
    for name in listed:
        validate("policy-show", json.loads(run(cli_env, "policy", "show", name, "--json").stdout))


def test_service_status_validates(cli_env: dict[str, str]) -> None:
    out = run(cli_env, "service", "status", "--json")
    validate("service-status", json.loads(out.stdout))
