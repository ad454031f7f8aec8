"""The service's per-uid and per-cgroup modes, system-wide: boot Debian 6.12 in QEMU and run
tests/vm/guest_modes.py in it, once per backend (`lsm` first; TRUSTDB_VM_MODES_BACKENDS picks).
Nothing system-wide happens on the host."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from tests.vm import runner
from tests.vm.test_lsm import assert_guest_passed, build_artifacts, guest_python
from tests.vm.test_service_vm import BACKENDS, KERNEL

HERE = Path(__file__).resolve().parent
MIN_CASES = 10
CHOSEN = os.environ.get("TRUSTDB_VM_MODES_BACKENDS", "lsm,tracepoint").split(",")

pytestmark = [pytest.mark.vm, pytest.mark.slow]


@pytest.fixture(scope="module")
def artifacts(tmp_path_factory: pytest.TempPathFactory) -> Path:
    dest = tmp_path_factory.mktemp("modes-vm")
    build_artifacts(dest)
    return dest


@pytest.mark.parametrize("backend", [b for b in BACKENDS if b in CHOSEN])
def test_modes_in_vm(backend: str, artifacts: Path) -> None:
    try:
        runner.find_kernel(KERNEL)
    except runner.VmError as e:
        pytest.fail(str(e))
    xml = artifacts / f"junit-modes-{backend}.xml"
    xml.unlink(missing_ok=True)
    result = runner.run(
        KERNEL,
        [guest_python(), "-m", "pytest", "-q", "-s", "-p", "no:cacheprovider", "-x",
         str(HERE / "guest_modes.py"), f"--junitxml={xml}"],
        shares=[artifacts],
        env={"TD_VM_ARTIFACTS": str(artifacts), "TD_VM_GUEST": "1", "TD_VM_BACKEND": backend,
             "PYTHONDONTWRITEBYTECODE": "1", "PYTHONPATH": str(runner.REPO)},
        lsm=BACKENDS[backend],
        timeout=2400,
        echo=bool(os.environ.get("TD_VM_ECHO")),
    )  # fmt: skip
    total = assert_guest_passed(result, xml, MIN_CASES, f"modes/{backend}")
    print(f"{backend}: {total} modes cases passed in the {KERNEL} VM ({result.seconds:.0f}s)")
