"""Secrets the agent policy means to hide, read through a file it does not name, tracepoint
backend (Landlock ABI 7). The policy hides /etc/shadow and /etc/gshadow, but /etc is granted
read-only and Debian's shadow utilities keep the previous version of each beside it
(/etc/shadow-, /etc/gshadow-), with the same password hashes.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from tests.engine.test_run import run_confined

pytestmark = [pytest.mark.root, pytest.mark.bpf]


def test_shadow_itself_is_hidden(interpreters_db: Path, run_env: dict[str, str]) -> None:
    """Control: the named file is covered (reads as empty)."""
    got = run_confined(interpreters_db, "wc -c < /etc/shadow", run_env)
    assert got.out.strip() == "0", (got.out, got.err)


@pytest.mark.parametrize("backup", ["/etc/shadow-", "/etc/gshadow-"])
def test_shadow_backup_readable(interpreters_db: Path, run_env: dict[str, str],
                                backup: str) -> None:
    if not os.path.isfile(backup) or os.path.getsize(backup) == 0:
        pytest.skip(f"{backup} does not exist on this host (Debian's shadow tools make it)")
    got = run_confined(interpreters_db, f"wc -c < {backup}", run_env)
    assert got.out.strip() in ("", "0"), f"{backup}: {got.out.strip()} bytes read inside"
