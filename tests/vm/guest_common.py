"""What the guest suites (tests/vm/guest_service.py, guest_systemd.py) share: running a
binary the way a person would and reading whether enforcement let it run, and the METRIC lines
the host-side tests print for the report. Imported inside the QEMU guest only."""

from __future__ import annotations

import subprocess
from pathlib import Path


def runs(path: str | Path, *args: str) -> bool:
    """Whether `path` ran to a clean exit (lsm: EPERM at exec; tracepoint: SIGKILL)."""
    try:
        r = subprocess.run([str(path), *args], capture_output=True, timeout=120, check=False)
    except PermissionError:
        return False
    return r.returncode == 0


def metric(label: str, name: str, value: float) -> None:
    """`METRIC <label> <name> <value>` on a line of its own (the host greps the console)."""
    print(f"\nMETRIC {label} {name} {value:.4f}", flush=True)
