"""Is the unit being restarted rather than stopped? (ExecStop: `trustdb service stop --from-unit`)

systemd runs ExecStop for `systemctl stop` and for `systemctl restart` alike, with the same
environment. What tells them apart is the job: a restart is queued as one job of type `restart`
(it turns into `start` only once the stop is done), which `systemctl list-jobs` shows while
ExecStop runs. A restart keeps the pins, so that the kernel never stops deciding while the new
daemon (an upgraded one, say) starts and adopts them; only a stop job unpins.

When the job cannot be read (no systemd, systemctl failed) the answer is "not a restart": an
explicit stop must always be able to end enforcement.
"""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

DEFAULT_UNIT = "trustdb.service"


def own_unit(cgroup_file: str = "/proc/self/cgroup") -> str:
    """The unit this process runs in (its cgroup's last component), else trustdb.service."""
    try:
        for line in Path(cgroup_file).read_text().splitlines():
            name = line.rsplit("/", 1)[-1]
            if name.endswith(".service"):
                return name
    except OSError:
        pass
    return DEFAULT_UNIT


def job_types(listing: str, unit: str) -> set[str]:
    """Job types queued for `unit` in `systemctl list-jobs --no-legend --plain` output
    (columns: JOB UNIT TYPE STATE)."""
    out = set()
    for line in listing.splitlines():
        fields = line.split()
        if len(fields) >= 4 and fields[1] == unit:
            out.add(fields[2])
    return out


def restarting(unit: str | None = None) -> bool:
    unit = unit or own_unit()
    try:
        r = subprocess.run(["systemctl", "list-jobs", "--no-legend", "--plain", "--no-pager"],
                           capture_output=True, text=True, timeout=10, check=False,
                           env={**os.environ, "SYSTEMD_COLORS": "0"})
    except (OSError, subprocess.TimeoutExpired):
        return False
    if r.returncode != 0:
        return False
    types = job_types(r.stdout, unit)
    return "restart" in types and "stop" not in types
