#!/usr/bin/env python3
"""Cost of the `lsm` backend on exec, measured inside a QEMU guest (the host kernel refuses BPF
LSM), as ratios from one run: bench/exec.py's counterpart for the BPF LSM tier.

In each stock kernel (6.1, 6.12; tests/vm/runner.py), alternating rounds of a C loop of
fork + execve(/bin/true) + wait (tests/vm/tdprobe.c `spawn`), pinned to CPU 1:
  none        no trustdb programs loaded (the named baseline)
  confined    lsm programs attached in enforce mode, the loop inside the scope cgroup
  outside     lsm programs attached, the loop outside the scope (what every other task pays)
and a getppid() loop with and without the programs (LSM hooks add nothing to unrelated
syscalls; a tracepoint on syscalls would). Under TCG, absolute times mean nothing (fork+exec is
~20 ms): only the ratios do. Needs root, qemu and the test kernels (packaging/install-deps.sh).
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

ROUNDS = 8
EXECS = 60
GETPPIDS = 200_000
CPU = 1


def guest(art: Path) -> int:
    """Inside the VM: measure and print one line per ratio."""
    from tests.vm.guest_lsm import _libraries
    from trustdb.abi import Mode
    from trustdb.backends.interface import EngineConfig, Scope
    from trustdb.backends.lsm import LsmBackend
    from trustdb.model import InodeKey

    probe = str(art / "tdprobe")
    true = os.path.realpath("/bin/true")
    cgroup = Path("/sys/fs/cgroup") / "td-bench"
    cgroup.mkdir(exist_ok=True)
    scope = Scope.for_cgroup(cgroup)
    trusted = [probe, true, *_libraries(probe, true)]

    def loop(*args: str, inside: bool) -> float:
        def setup() -> None:
            os.sched_setaffinity(0, {CPU})
            if inside:
                (cgroup / "cgroup.procs").write_text("0")

        out = subprocess.run([probe, *args], capture_output=True, text=True, preexec_fn=setup,
                             check=True).stdout  # fmt: skip
        return int(out.split()[0]) / 1e6

    def warm_up() -> None:
        # Attaching or detaching patches kernel text, and TCG then retranslates that code:
        # let it settle before measuring, on both sides.
        loop("spawn", str(EXECS), true, inside=True)
        loop("spawn", str(EXECS // 2), true, inside=False)
        loop("getppid", str(GETPPIDS // 2), inside=False)

    samples: dict[str, list[float]] = {
        k: [] for k in ("none", "none2", "confined", "outside", "pp0", "pp1")
    }
    try:
        for r in range(ROUNDS):
            order: list[Callable[[], None]] = []

            def unloaded() -> None:
                warm_up()
                samples["none"].append(loop("spawn", str(EXECS), true, inside=True))
                samples["none2"].append(loop("spawn", str(EXECS), true, inside=True))
                samples["pp0"].append(loop("getppid", str(GETPPIDS), inside=False))

            def loaded() -> None:
                backend = LsmBackend()
                backend.load(EngineConfig(mode=Mode.ENFORCE, scope=scope,
                                          supervisor_tgid=os.getpid()))  # fmt: skip
                try:
                    backend.trusted_inodes.add([InodeKey.from_stat(os.stat(p)) for p in trusted])
                    backend.attach()
                    warm_up()
                    samples["confined"].append(loop("spawn", str(EXECS), true, inside=True))
                    samples["outside"].append(loop("spawn", str(EXECS), true, inside=False))
                    samples["pp1"].append(loop("getppid", str(GETPPIDS), inside=False))
                finally:
                    backend.detach()

            order = [unloaded, loaded] if r % 2 == 0 else [loaded, unloaded]
            for step in order:
                step()
    finally:
        cgroup.rmdir()
    med = {k: statistics.median(v) for k, v in samples.items()}
    base = med["none"]
    print(
        f"exec /bin/true, lsm backend ({os.uname().release}, TCG, CPU {CPU}, "
        f"{ROUNDS}x{EXECS}): no programs {base / EXECS:.1f} ms/exec; "
        f"confined x{med['confined'] / base:.3f}; outside the scope x{med['outside'] / base:.3f}; "
        f"noise floor (no programs vs itself) x{med['none2'] / base:.3f}"
    )
    print(
        f"syscall tax, getppid outside the scope: x{med['pp1'] / med['pp0']:.3f} "
        f"({med['pp0'] / GETPPIDS * 1e6:.0f} -> {med['pp1'] / GETPPIDS * 1e6:.0f} ns under TCG)"
    )
    return 0


def host(kernels: list[str]) -> int:
    from tests.vm import runner
    from tests.vm.test_lsm import build_artifacts, guest_python

    if os.geteuid() != 0:
        print("bench/exec_lsm.py needs root (it boots a VM and loads BPF in it)", file=sys.stderr)
        return 1
    with tempfile.TemporaryDirectory(prefix="trustdb-bench-") as tmp:
        art = Path(tmp)
        build_artifacts(art)
        for kernel in kernels:
            result = runner.run(
                kernel,
                [guest_python(), str(Path(__file__).resolve()), "--guest", str(art)],
                shares=[art],
                env={"PYTHONDONTWRITEBYTECODE": "1"},
                timeout=900,
            )
            lines = [ln for ln in result.console.splitlines()
                     if ln.startswith(("exec ", "syscall ", "Traceback", "  "))]  # fmt: skip
            print(f"[{kernel}] " + f"\n[{kernel}] ".join(lines or ["no output"]))
            if result.returncode != 0:
                print(result.console[-3000:], file=sys.stderr)
                return 1
    return 0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--kernel", action="append", help="6.1 and/or 6.12 (default: both)")
    parser.add_argument("--guest", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.guest:
        return guest(args.guest)
    return host(args.kernel or ["6.1", "6.12"])


if __name__ == "__main__":
    sys.exit(main())
