"""ExecStop tells a restart job from a stop job (the real run under systemd as PID 1 is in the
VM tier when the guest can boot systemd; here: the parsing, and the answer without systemd)."""

from __future__ import annotations

from pathlib import Path

import pytest

from trustdb.service import unitjob

LISTING = """\
4711 trustdb.service restart running
4712 multi-user.target start waiting
"""


def test_restart_job_is_seen() -> None:
    assert unitjob.job_types(LISTING, "trustdb.service") == {"restart"}
    assert unitjob.job_types(LISTING, "other.service") == set()
    assert unitjob.job_types("4711 trustdb.service stop running\n", "trustdb.service") == {"stop"}


def test_own_unit_from_cgroup(tmp_path: Path) -> None:
    cg = tmp_path / "cgroup"
    cg.write_text("0::/system.slice/trustdb.service\n")
    assert unitjob.own_unit(str(cg)) == "trustdb.service"
    cg.write_text("0::/user.slice/user-0.slice/session-1.scope\n")
    assert unitjob.own_unit(str(cg)) == unitjob.DEFAULT_UNIT


def test_without_systemd_a_stop_is_a_stop() -> None:
    """No job can be read (no systemd here): never keep the pins on that account."""
    if Path("/run/systemd/system").is_dir():
        pytest.skip("systemd runs here: its answer is what counts")
    assert unitjob.restarting() is False
