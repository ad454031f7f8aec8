"""Fixtures for the attack tests: a trust database that also holds the interpreters the `agent`
policy names (Debian's python3 with its stdlib, perl with its modules, awk), so that a failed
attack fails because of the rule it attacks and not because the interpreter could not start.

Every attack runs inside `trustdb run` (the run scopes all enforcement to its own cgroup).
Tests of a route that is still open carry `xfail(strict=True, reason="HOLE: ...")`: the
suite stays green while the hole is open and turns red when someone closes it without
removing the mark.
"""

from __future__ import annotations

import os
import shutil
import sys
from pathlib import Path

import pytest

from tests.engine import test_run as base

INTERPRETERS = ("/usr/bin/python3.11", "/usr/bin/perl", "/usr/bin/mawk", "/usr/bin/busybox")
LIBRARY_TREES = (
    "/usr/lib/python3.11", "/usr/lib/python3/dist-packages", "/usr/share/perl",
    "/usr/lib/x86_64-linux-gnu/perl-base", "/usr/lib/x86_64-linux-gnu/perl", "/usr/share/perl5",
)

run_env = base.run_env


def inline_code(path: str) -> str:
    """Interpreter arguments that run the attacker's file `path` as inline code (`-c`), which
    the agent policy allows (deny_inline is off): the attacker's own code needs no trust, and
    an untrusted *script file* would be refused before the attack it carries could start."""
    return f"-c \"exec(open('{path}').read())\""
no_leftovers = base.no_leftovers


def _files_under(tops: tuple[str, ...]) -> set[str]:
    out = set()
    for top in tops:
        for root, _, names in os.walk(top):
            for n in names:
                p = os.path.join(root, n)
                if os.path.isfile(p) and not os.path.islink(p):
                    out.add(p)
    return out


@pytest.fixture(scope="session")
def interpreters_db(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The test tools (tests/engine/test_run.py), plus the policy's interpreters, their
    libraries and their script libraries."""
    if os.geteuid() != 0:
        pytest.fail("attack tests need root (CI runs as root)")
    missing = [p for p in INTERPRETERS if not os.path.isfile(p)]
    if missing:
        pytest.fail(f"interpreters missing: {missing} (packaging/apt-packages.txt installs them)")
    db = tmp_path_factory.mktemp("attacks") / "db"
    tools = [shutil.which(t) for t in base.TOOLS]
    binaries = [p for p in tools if p] + [sys.executable, *INTERPRETERS]
    base.trust_files(db, base._closure(binaries) | _files_under(LIBRARY_TREES))
    return db
