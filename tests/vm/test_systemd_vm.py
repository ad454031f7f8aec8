"""The shipped unit under real systemd as PID 1: boot Debian 6.12 in QEMU with the host's
systemd over the read-only root (tests/vm/runner.py, `systemd=True`) and run
tests/vm/guest_systemd.py there as a oneshot unit. Everything system-wide happens in the guest.
Tracepoint backend (the guest boots without bpf in lsm=, like Ubuntu and this host)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from tests.vm import runner
from tests.vm.test_lsm import assert_guest_passed, build_artifacts, guest_python

HERE = Path(__file__).resolve().parent
KERNEL = os.environ.get("TRUSTDB_VM_KERNELS", "6.12").split(",")[-1]
MIN_CASES = 7

pytestmark = [pytest.mark.vm, pytest.mark.slow]


def test_unit_under_systemd_in_vm(tmp_path: Path) -> None:
    assert (runner.REPO / "build" / "bpf" / "tracepoint.bpf.o").exists(), "run `make bpf`"
    if not Path("/lib/systemd/systemd").exists():
        pytest.skip("no systemd on this machine to boot in the guest")
    try:
        runner.find_kernel(KERNEL)
    except runner.VmError as e:
        pytest.fail(str(e))
    build_artifacts(tmp_path)
    xml = tmp_path / "junit-systemd.xml"
    result = runner.run(
        KERNEL,
        [guest_python(), "-m", "pytest", "-q", "-s", "-p", "no:cacheprovider", "-x",
         str(HERE / "guest_systemd.py"), f"--junitxml={xml}"],
        shares=[tmp_path],
        env={"TD_VM_ARTIFACTS": str(tmp_path), "TD_VM_GUEST": "1",
             "PYTHONDONTWRITEBYTECODE": "1", "PYTHONPATH": str(runner.REPO)},
        lsm="lockdown,capability,landlock,yama",
        timeout=1500,
        echo=bool(os.environ.get("TD_VM_ECHO")),
        systemd=True,
    )  # fmt: skip
    total = assert_guest_passed(result, xml, MIN_CASES, "systemd", tail_lines=120)
    print(f"{total} systemd cases passed in the {KERNEL} VM ({result.seconds:.0f}s)")
