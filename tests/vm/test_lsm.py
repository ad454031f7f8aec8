"""BPF LSM tier: boot stock Debian kernels (6.1, 6.12) in QEMU and run the enforcement suite
(tests/vm/guest_lsm.py) inside with the `lsm` backend, EPERM expected.

The host kernel refuses BPF LSM, so this is the only place the lsm backend runs for real. One VM
boot per kernel; the guest's pytest writes JUnit XML to a shared directory, and this test fails
with every failing case's name and message (and the console tail) when anything in it failed.
qemu and the kernels come from packaging/install-deps.sh: their absence is a failure, not a skip.
"""

from __future__ import annotations

import os
import subprocess
import sys
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest

from tests.vm import runner

# `make test-lsm KERNEL=6.1` picks one (pytest -k "6.1" would also match 6.12).
KERNELS = os.environ.get("TRUSTDB_VM_KERNELS", "6.1,6.12").split(",")
HERE = Path(__file__).resolve().parent
# The suite must exercise this many cases; fewer means something was silently not collected.
MIN_CASES = 55

pytestmark = [pytest.mark.vm, pytest.mark.slow]


def build_artifacts(dest: Path) -> None:
    """The guest suite's binaries: tdprobe (trusted), the same program with other content
    (untrusted), an untrusted library whose constructor leaves a marker, ELF interpreters of
    our own (ET_EXEC; a static PIE with holes) and programs naming them in PT_INTERP, and
    tdprobe with an executable stack."""
    cc = ["cc", "-O2", "-Wall"]
    main = dest / "main.c"
    main.write_text("int main(void) { return 0; }\n")
    interp = [*cc, "-nostdlib", HERE / "tdinterp.c"]
    builds = [
        [*cc, "-o", dest / "tdprobe", HERE / "tdprobe.c"],
        [*cc, '-DVARIANT="untrusted"', "-o", dest / "untrusted", HERE / "tdprobe.c"],
        [*cc, "-shared", "-fPIC", "-o", dest / "libtdevil.so", HERE / "tdevil.c"],
        [*cc, "-z", "execstack", "-o", dest / "execstack", HERE / "tdprobe.c"],
        [*interp, "-static", "-no-pie", "-o", dest / "interp-exec"],
        [*interp, "-static-pie", "-fPIE", "-Wl,-z,max-page-size=0x200000",
         "-Wl,-z,separate-code", "-o", dest / "interp-gap"],
        # PT_INTERP names the copy the guest suite makes on its tmpfs (/tmp/td)
        [*cc, "-Wl,--dynamic-linker=/tmp/td/interp-exec", "-o", dest / "uses-interp-exec", main],
        [*cc, "-Wl,--dynamic-linker=/tmp/td/interp-gap", "-o", dest / "uses-interp-gap", main],
    ]
    for argv in builds:
        subprocess.run([str(a) for a in argv], check=True)


def guest_python() -> str:
    """The interpreter that runs this test, by its real path (pyenv shims are slow bash scripts
    and Debian's python3 3.11.2 has the fanotify/exec deadlock of gh-104372)."""
    return os.path.realpath(sys.executable)


@pytest.fixture(scope="module")
def artifacts(tmp_path_factory: pytest.TempPathFactory) -> Path:
    dest = tmp_path_factory.mktemp("lsm-vm")
    build_artifacts(dest)
    return dest


def _junit_failures(xml: Path) -> tuple[int, list[str]]:
    root = ET.parse(xml).getroot()
    suite = root if root.tag == "testsuite" else root.find("testsuite")
    assert suite is not None, f"{xml}: no testsuite"
    problems = []
    for case in suite.iter("testcase"):
        for kind in ("failure", "error", "skipped"):
            el = case.find(kind)
            # A guest case marked xfail (a named, known gap) is reported, not failed.
            if el is not None and el.get("type") != "pytest.xfail":
                msg = (el.get("message") or "").splitlines()[0:1]
                problems.append(f"{kind}: {case.get('name')}: {' '.join(msg)}")
    return int(suite.get("tests", "0")), problems


def assert_guest_passed(result: runner.VmResult, xml: Path, min_cases: int, label: str, *,
                        tail_lines: int = 80) -> int:
    """The verdict on one guest pytest run: it finished, wrote its junit file, every case
    passed (a guest xfail is a named gap, reported), it exited 0, and at least `min_cases` ran.
    Prints the guest's `METRIC` lines for the report first. Returns how many cases ran."""
    tail = "\n".join(result.console.splitlines()[-tail_lines:])
    for line in result.console.splitlines():
        if line.startswith("METRIC "):
            print(line)
    assert not result.timed_out, f"{label}: VM timed out after {result.seconds:.0f}s\n{tail}"
    assert xml.exists(), f"{label}: the guest wrote no results (exit {result.returncode})\n{tail}"
    total, problems = _junit_failures(xml)
    assert not problems, (f"{label}: {len(problems)} of {total} cases:\n" + "\n".join(problems)
                          + "\n" + tail)
    assert result.returncode == 0, f"{label}: guest pytest exited {result.returncode}\n{tail}"
    assert total >= min_cases, f"{label}: only {total} cases ran"
    return total


@pytest.mark.parametrize("kernel", KERNELS)
def test_lsm_suite_in_vm(kernel: str, artifacts: Path) -> None:
    bpf_object = runner.REPO / "build" / "bpf" / "lsm.bpf.o"
    assert bpf_object.exists(), f"{bpf_object} missing: run `make bpf`"
    try:
        runner.find_kernel(kernel)
    except runner.VmError as e:
        pytest.fail(str(e))  # install-deps installs both kernels; missing is a setup failure
    xml = artifacts / f"junit-{kernel}.xml"
    xml.unlink(missing_ok=True)
    result = runner.run(
        kernel,
        [
            guest_python(), "-m", "pytest", "-q", "-p", "no:cacheprovider",
            str(HERE / "guest_lsm.py"), f"--junitxml={xml}",
        ],
        shares=[artifacts],
        env={"TD_VM_ARTIFACTS": str(artifacts), "PYTHONDONTWRITEBYTECODE": "1",
             "PYTHONPATH": str(runner.REPO)},
        timeout=900,
    )  # fmt: skip
    total = assert_guest_passed(result, xml, MIN_CASES, kernel, tail_lines=60)
    print(f"{kernel}: {total} cases passed in the VM ({result.seconds:.0f}s with boot)")


@pytest.mark.bpf
def test_probe_on_this_kernel_says_why(as_root: None) -> None:
    """On the host: the lsm probe succeeds only where BPF LSM is active, and select() falls
    back to tracepoint with the refusal spelled out (the case `trustdb status` reports)."""
    from trustdb import backends
    from trustdb.backends.lsm import LsmBackend, active_lsms

    probe = LsmBackend().probe()
    active = active_lsms()
    if active is not None and "bpf" in active:
        assert probe.ok, probe.reason
        return
    assert not probe.ok and probe.reason.startswith("lsm: "), probe
    chosen = backends.select()
    assert chosen.name == "tracepoint"
    assert [name for name, _ in chosen.refused] == ["lsm"]


# What the probe says in a guest whose kernel has CONFIG_BPF_LSM but was booted without `bpf` in
# `lsm=` (Ubuntu's default): the lsm backend must be refused, and select() must fall back.
PROBE_SCRIPT = """
from trustdb import backends
chosen = backends.select()
print("CHOSEN", chosen.name)
for name, reason in chosen.refused:
    print("REFUSED", name, reason)
"""


@pytest.mark.parametrize("kernel", KERNELS[-1:])
def test_lsm_refused_without_bpf_in_lsm_list(kernel: str, artifacts: Path) -> None:
    script = artifacts / "probe.py"
    script.write_text(PROBE_SCRIPT)
    result = runner.run(
        kernel,
        [guest_python(), str(script)],
        shares=[artifacts],
        env={"PYTHONDONTWRITEBYTECODE": "1",
             "PYTHONPATH": str(runner.REPO)},
        lsm="lockdown,capability,landlock,yama",
        timeout=600,
    )
    lines = [ln for ln in result.console.splitlines() if ln.startswith(("CHOSEN", "REFUSED"))]
    assert result.returncode == 0, result.console[-3000:]
    assert "CHOSEN tracepoint" in lines, lines
    refused = [ln for ln in lines if ln.startswith("REFUSED lsm")]
    assert refused and "BPF LSM not active" in refused[0], lines
