"""The tracepoint backend's suites (tests/engine/test_tracepoint.py, and the issue 8 attacks of
tests/engine/test_routes.py) on other kernels: Debian's 6.1 and 6.12 booted in QEMU
(tests/vm/runner.py), to prove the one CO-RE object loads and enforces there too (inode ctime
field layouts, the pre-6.13 mmap_lock tracepoint signature, maple tree, 6.1's verifier).

The guest sees the host's files read-only and has cgroup2 at /sys/fs/cgroup; the slow test
(which stats all of /usr over 9p) is left out.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

from tests.vm import runner

KERNELS = os.environ.get("TRUSTDB_VM_KERNELS", "6.1,6.12").split(",")

pytestmark = [pytest.mark.vm, pytest.mark.slow]


@pytest.mark.parametrize("kernel", KERNELS)
def test_tracepoint_suite_in_vm(kernel: str, tmp_path: Path) -> None:
    obj = runner.REPO / "build" / "bpf" / "tracepoint.bpf.o"
    assert obj.exists(), f"{obj} missing: run `make bpf`"
    try:
        runner.find_kernel(kernel)
    except runner.VmError as e:
        pytest.fail(str(e))
    log = tmp_path / "guest.log"
    script = (
        f"{os.path.realpath(sys.executable)} -m pytest -q -p no:cacheprovider "
        f'-m "not slow" tests/engine/test_tracepoint.py tests/engine/test_routes.py > {log} 2>&1'
    )
    result = runner.run(
        kernel,
        ["sh", "-c", script],
        shares=[tmp_path],
        env={"TRUSTDB_CGROUP2": "/sys/fs/cgroup", "PYTHONDONTWRITEBYTECODE": "1",
             "PYTHONPATH": str(runner.REPO)},
        timeout=900,
    )
    out = log.read_text() if log.exists() else result.console[-4000:]
    assert not result.timed_out, f"{kernel}: timed out\n{out[-4000:]}"
    assert result.returncode == 0, f"{kernel}: guest pytest exit {result.returncode}\n{out[-6000:]}"
    assert " passed" in out and "failed" not in out, out[-4000:]
