"""The CLI contract, through the real `trustdb` command: global options before or after the
verb, --version and -h, help in words, and the exit-code table of the README."""

from __future__ import annotations

import json
import os
from pathlib import Path

from tests.test_cli_db import run

VERBS = ["trust", "untrust", "check", "list", "sources", "status", "verify", "why", "log",
         "run", "backends", "import deb", "import rpm", "import python"]


def test_version_and_short_help(cli_env: dict[str, str]) -> None:
    version = run(cli_env, "--version")
    assert version.returncode == 0 and version.stdout.startswith("trustdb ")
    short = run(cli_env, "-h")
    assert short.returncode == 0 and "Usage:" in short.stdout and "Exit status" in short.stdout
    assert run(cli_env, "status", "-h").returncode == 0


def test_help_is_in_words_not_python_types(cli_env: dict[str, str]) -> None:
    for verb in VERBS:
        out = run(cli_env, *verb.split(), "--help")
        assert out.returncode == 0, (verb, out.stderr)
        for python_type in ("<list[", "<str>", "<bool>", "<path>", "<int>"):
            assert python_type not in out.stdout, (verb, python_type)


def test_global_options_before_or_after_the_verb(tmp_path: Path, cli_env: dict[str, str]) -> None:
    env = {k: v for k, v in cli_env.items() if k != "TRUSTDB_DB"}
    db = cli_env["TRUSTDB_DB"]
    assert run(env, "--db", db, "trust", "/bin/true").returncode == 0
    before = run(env, "--db", db, "--json", "status")
    after = run(env, "status", "--db", db, "--json")
    assert before.returncode == after.returncode == 0, before.stderr + after.stderr
    assert json.loads(before.stdout)["entries"] == json.loads(after.stdout)["entries"] == 1
    # A value after the verb wins over one before it.
    other = tmp_path / "missing"
    assert run(env, "--db", db, "status", "--db", str(other)).returncode == 4
    # --quiet before the verb reaches the verb: a trusted check prints nothing.
    quiet = run(env, "--quiet", "--db", db, "check", "/bin/true")
    assert quiet.returncode == 0 and quiet.stdout == ""


def test_read_verbs_never_create_a_database(tmp_path: Path, cli_env: dict[str, str]) -> None:
    missing = tmp_path / "nope"
    for verb in (["check", "/bin/true"], ["list"], ["sources"], ["status"], ["verify"],
                 ["untrust", "/bin/true"], ["why", "/bin/true"]):
        out = run(cli_env, "--db", str(missing), *verb)
        assert out.returncode == 4, (verb, out.stderr)
        assert out.stderr.startswith("trustdb: error: no trust database at ")
        assert out.stderr.count("\n") == 1
        assert not missing.exists()


def test_trust_into_a_typo_path_is_refused(tmp_path: Path, cli_env: dict[str, str]) -> None:
    typo = tmp_path / "typo" / "db"
    out = run(cli_env, "trust", "--db", str(typo), "/bin/true")
    assert out.returncode == 4 and "does not exist" in out.stderr
    assert not typo.parent.exists()
    fresh = tmp_path / "fresh"
    made = run(cli_env, "trust", "--db", str(fresh), "/bin/true")
    assert made.returncode == 0 and "creating a new trust database" in made.stderr


def test_exit_codes(tmp_path: Path, cli_env: dict[str, str]) -> None:
    assert run(cli_env, "trust", "/bin/true").returncode == 0
    assert run(cli_env, "check", "/bin/true").returncode == 0
    assert run(cli_env, "check", "/bin/sh").returncode == 1
    assert run(cli_env, "check", "--no-such-option").returncode == 2
    gone = tmp_path / "gone"
    assert run(cli_env, "trust", "/bin/true", str(gone)).returncode == 3


def test_run_exit_codes_name_the_problem(tmp_path: Path, cli_env: dict[str, str]) -> None:
    assert run(cli_env, "trust", "/bin/true").returncode == 0
    not_exec = run(cli_env, "run", "--", "/etc/passwd")
    assert not_exec.returncode == 126
    assert not_exec.stderr == "trustdb: error: /etc/passwd: permission denied (not executable)\n"
    directory = run(cli_env, "run", "--", "/etc")
    assert directory.returncode == 126 and "is a directory" in directory.stderr
    missing = run(cli_env, "run", "--", "no-such-command-xyz")
    assert missing.returncode == 127
    assert missing.stderr == "trustdb: error: no-such-command-xyz: command not found\n"
    no_db = run(cli_env, "--db", str(tmp_path / "nodb"), "run", "--", "/bin/true")
    assert no_db.returncode == (4 if os.geteuid() == 0 else 5)
