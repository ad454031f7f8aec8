"""Attack cases both tiers run: the host's tracepoint tests (tests/engine/test_routes.py) and the
lsm guest (tests/vm/guest_lsm.py) import them from here, so the two backends face the same
attacks."""

from __future__ import annotations

SELF_WRITTEN_CODE = [
    ["selfcode", "rwx"],
    ["selfcode", "mprotect"],
    ["selfcode", "shared"],
    ["shmexec"],
    ["readimpliesexec"],
    ["fileselfcode", "wx", "PROBE"],
    ["fileselfcode", "written", "PROBE"],
]
"""Issue 8 route 4, code the process writes itself: anonymous RWX, mprotect(RX) of a written
buffer, shared anonymous RWX, SysV SHM_EXEC, READ_IMPLIES_EXEC, and a private mapping of a
trusted file made W+X or written then RX (tdprobe's verbs; PROBE is tdprobe's own path)."""


def case_id(argv: list[str]) -> str:
    return "-".join(argv[:2])
