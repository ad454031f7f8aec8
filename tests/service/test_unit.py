"""The unit file: the lifetime settings issue 9 asks for, and systemd's own security score."""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import pytest

UNIT = Path(__file__).resolve().parents[2] / "packaging" / "trustdb.service"


def _settings() -> dict[str, list[str]]:
    out: dict[str, list[str]] = {}
    for line in UNIT.read_text().splitlines():
        if "=" in line and not line.startswith(("#", "[")):
            k, v = line.split("=", 1)
            out.setdefault(k, []).append(v)
    return out


def test_fail_closed_lifetime_settings() -> None:
    s = _settings()
    assert s["Type"] == ["notify"]
    assert s["Restart"] == ["always"]
    assert s["StartLimitIntervalSec"] == ["0"]
    assert "WatchdogSec" in s
    assert any("service stop --from-unit" in v for v in s["ExecStop"])
    assert any("-HUP" in v for v in s["ExecReload"])
    assert "systemd-user-sessions.service" in s["Before"][0]


@pytest.mark.skipif(shutil.which("systemd-analyze") is None, reason="no systemd-analyze")
def test_security_score_at_most_5() -> None:
    r = subprocess.run(["systemd-analyze", "security", "--offline=yes", str(UNIT)],
                       capture_output=True, text=True, check=False)
    m = re.search(r"Overall exposure level for \S+: ([0-9.]+)", r.stdout + r.stderr)
    assert m, r.stdout[-500:] + r.stderr[-500:]
    print(f"systemd-analyze security: {m.group(1)}")
    assert float(m.group(1)) <= 5.0
