#!/usr/bin/env python3
"""Cost of the tracepoint backend's mapping checks, as ratios measured in one run.

The backend checks executable file mappings from two tracepoints (mmap_lock_released and
vm_unmapped_area) instead of syscall tracepoints: those fire on every mmap_lock write release
and address search of every process, confined or not. This measures, with a C loop of
mmap(file) + munmap pinned to CPU 1, in alternating rounds with and without the programs:
1. outside the scope, PROT_READ: the tax on unrelated processes (the early exits);
2. inside the scope, PROT_READ|PROT_EXEC of a trusted file: the full check (tree walk, lookup).
Baseline: the same loop with no programs attached. Needs root; enforces only in its cgroup.
"""

from __future__ import annotations

import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from trustdb.abi import Mode
from trustdb.backends.interface import EngineConfig, Scope
from trustdb.backends.tracepoint import TracepointBackend
from trustdb.engine import Engine
from trustdb.libbpf import held_program_ids
from trustdb.model import InodeKey

ROUNDS = 8
N = 200_000
CPU = "1"
CGROUP2 = Path("/sys/fs/cgroup/unified")

LOOP_C = r"""
#include <fcntl.h>
#include <stdio.h>
#include <stdlib.h>
#include <sys/mman.h>
#include <time.h>
int main(int argc, char **argv)
{
	long n = atol(argv[1]);
	int prot = atoi(argv[2]);
	int fd = open(argv[3], O_RDONLY);
	struct timespec a, b;
	clock_gettime(CLOCK_MONOTONIC, &a);
	for (long i = 0; i < n; i++) {
		void *p = mmap(NULL, 4096, prot, MAP_PRIVATE, fd, 0);
		if (p == MAP_FAILED) return 1;
		munmap(p, 4096);
	}
	clock_gettime(CLOCK_MONOTONIC, &b);
	printf("%.1f\n", ((b.tv_sec - a.tv_sec) * 1e9 + (b.tv_nsec - a.tv_nsec)) / n);
	return 0;
}
"""


def run(loop: Path, prot: int, target: Path, cgroup: Path | None) -> float:
    cmd = ["taskset", "-c", CPU, str(loop), str(N), str(prot), str(target)]
    if cgroup is not None:
        cmd = ["/bin/sh", "-c", 'echo $$ > "$0/cgroup.procs" && exec "$@"', str(cgroup), *cmd]
    out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout
    return float(out)


def program_costs(
    loop: Path, prot: int, lib: Path, where: Path | None, config: EngineConfig, keys: list[InodeKey]
) -> str:
    """Mean run time per invocation of each program over one loop (steadier than wall-clock
    ratios on a noisy machine; bpf_stats itself adds a few ns per run)."""
    stats = Path("/proc/sys/kernel/bpf_stats_enabled")
    old = stats.read_text().strip()
    try:
        with Engine(config, backend=TracepointBackend()) as engine:
            engine.trusted_inodes.add(keys)
            stats.write_text("1")
            run(loop, prot, lib, where)
            stats.write_text(old)
            out = []
            for pid in sorted(held_program_ids()):
                info = json.loads(
                    subprocess.run(
                        ["bpftool", "-j", "prog", "show", "id", str(pid)],
                        capture_output=True,
                        text=True,
                        check=True,
                    ).stdout
                )
                if info.get("run_cnt"):
                    out.append(
                        f"{info['name']} {info['run_time_ns'] // info['run_cnt']} ns"
                        f" x{info['run_cnt']}"
                    )
            return ", ".join(out)
    finally:
        stats.write_text(old)


def trusted_closure(paths: list[str]) -> list[InodeKey]:
    out = subprocess.run(["ldd", *paths], capture_output=True, text=True, check=False).stdout
    files = {os.path.realpath(p) for p in paths}
    files.update(os.path.realpath(t) for t in out.split() if t.startswith("/"))
    return [InodeKey.from_stat(os.stat(f)) for f in files if os.path.isfile(f)]


def main() -> int:
    if os.geteuid() != 0:
        print("bench/mmap.py needs root (it loads BPF programs)", file=sys.stderr)
        return 1
    work = Path(tempfile.mkdtemp(prefix="trustdb-bench-mmap-"))
    cg = CGROUP2 / f"trustdb-bench-{uuid.uuid4().hex[:8]}"
    cg.mkdir()
    try:
        (work / "loop.c").write_text(LOOP_C)
        loop = work / "loop"
        subprocess.run(["cc", "-O2", "-o", str(loop), str(work / "loop.c")], check=True)
        lib = Path(os.path.realpath("/lib/x86_64-linux-gnu/libc.so.6"))
        keys = trusted_closure([str(loop), "/usr/bin/taskset", str(lib)])
        config = EngineConfig(mode=Mode.ENFORCE, scope=Scope.for_cgroup(cg), max_entries=4096)
        cases = [("outside the scope, PROT_READ", 1, None), ("confined, PROT_READ|EXEC", 5, cg)]
        for label, prot, where in cases:
            ratios, with_, without = [], [], []
            for i in range(ROUNDS):
                if i % 2:
                    base = run(loop, prot, lib, where)
                with Engine(config, backend=TracepointBackend()) as engine:
                    engine.trusted_inodes.add(keys)
                    t = run(loop, prot, lib, where)
                if not i % 2:
                    base = run(loop, prot, lib, where)
                with_.append(t)
                without.append(base)
                ratios.append(t / base)
            print(
                f"  per call, from kernel.bpf_stats: {program_costs(loop, prot, lib, where, config, keys)}"
            )
            print(
                f"mmap+munmap {label} (CPU {CPU}, {ROUNDS}x{N}): "
                f"{statistics.median(without):.0f} ns without programs, "
                f"{statistics.median(with_):.0f} ns with: x{statistics.median(ratios):.3f}"
            )
    finally:
        shutil.rmtree(work, ignore_errors=True)
        for _ in range(50):
            try:
                cg.rmdir()
                break
            except OSError:
                time.sleep(0.05)
    return 0


if __name__ == "__main__":
    sys.exit(main())
