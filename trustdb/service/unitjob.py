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
import sys
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


LIST_JOBS_TIMEOUT_S = 3.0
"""Well inside the unit's TimeoutStopSec (10 s): a hung systemctl must leave ExecStop time to
unpin, never let the stop end by timeout with the pins still in place."""


def restarting(unit: str | None = None) -> bool:
    unit = unit or own_unit()
    try:
        r = subprocess.run(["systemctl", "list-jobs", "--no-legend", "--plain", "--no-pager"],
                           capture_output=True, text=True, timeout=LIST_JOBS_TIMEOUT_S,
                           check=False, env={**os.environ, "SYSTEMD_COLORS": "0"})
    except (OSError, subprocess.TimeoutExpired) as e:
        _say(f"cannot read the unit's job ({e}): stopping, not restarting")
        return False
    if r.returncode != 0:
        _say(f"systemctl list-jobs failed ({r.stderr.strip() or r.returncode}): stopping")
        return False
    types = job_types(r.stdout, unit)
    _say(f"jobs queued for {unit}: {', '.join(sorted(types)) or 'none'}")
    return "restart" in types and "stop" not in types


def _say(line: str) -> None:
    """What ExecStop read goes to the journal (its stderr), so a gap after a restart, or pins
    kept after a stop, can be traced to the job systemd showed."""
    print(f"trustdb: {line}", file=sys.stderr, flush=True)
