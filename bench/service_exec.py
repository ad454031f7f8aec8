"""Exec cost of the system-wide service, measured inside a QEMU guest as a ratio from one run.

Baseline `none`: no trustdb programs anywhere. `service`: `trustdb daemon --mode enforce`
running (pinned programs attached, the mirror's map filled, the first-seen fanotify pre-warm
answering every exec on the machine). The loop is tdprobe's `spawn` (fork + execve(/bin/true)
+ wait, a C loop), pinned to one CPU. tests/vm/guest_service.py takes the samples at three
points of its run (none, service, none again after `trustdb service stop`) through `sample()`
and prints `METRIC <backend> exec_ratio`; under TCG absolute times mean nothing, the ratio does.

    python3 -m pytest -s tests/vm/test_service_vm.py   # prints the METRIC lines

Under plain TCG the guest's clock is the host's, so on a loaded host two identical rounds
differ by up to 20%. `-k exec_cost_counted` boots the guest with `-icount` (one vCPU, every
instruction 8 ns of guest time) and prints `METRIC <backend>/icount ...`: the same rounds, and
`exec_ratio_programs_vs_none`, our programs' counted time per exec (bpf_stats) over an exec's.
"""

from __future__ import annotations

import os
import statistics
import subprocess
from pathlib import Path

EXECS = 40
SAMPLES = 3
CPU = 1


def sample(probe: Path, target: str = "/bin/true", *, execs: int = EXECS,
           samples: int = SAMPLES) -> list[float]:
    """Seconds per exec, `samples` times, after one warm-up loop (TCG retranslates patched
    kernel text after an attach or detach)."""

    def loop(n: int) -> float:
        out = subprocess.run([str(probe), "spawn", str(n), os.path.realpath(target)],
                             capture_output=True, text=True, check=True,
                             preexec_fn=lambda: os.sched_setaffinity(0, {CPU % (os.cpu_count() or 1)}))
        return int(out.stdout.split()[0]) / 1e9 / n

    loop(execs // 2)
    return [loop(execs) for _ in range(samples)]


def ratio(service: list[float], none: list[float]) -> float:
    return statistics.median(service) / statistics.median(none)
