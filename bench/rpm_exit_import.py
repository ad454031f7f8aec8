"""What the import at the exit of an rpm run by hand costs the daemon's main loop: the latency
of the first-seen handler's questions (which time out after ASK_TIMEOUT_S and are then denied)
while the daemon verifies what that rpm wrote against a large rpmdb, against the same questions
with no import running (the baseline), in alternating rounds.

Real parts: the real rpm installs P rpmbuild packages of F files each (F small scripts, exec
bit: all verified) into a root on a tmpfs this bench mounts, so the rpmdb holds P*F files; the
daemon's side is the real InstallerTrust (trustdb.service.installers: its notification group on
that tmpfs only: it answers nothing, so it can deny nothing), driven by a loop like the daemon's
(poll its fds, on_ready, sync_windows); then `rpm -i --replacepkgs` of one small package by
hand (its window, its exit, the import of the whole rpmdb). A thread asks a question every
ASK_EVERY_S, as the handler would for an exec during the window. Printed: the longest main-loop
step and the question latency (median, max), each with and without an import running; the
database was imported once before (the digest cache is warm: what a system's rpmdb is).

    flock /work/wt/bench.lock nice python3 bench/rpm_exit_import.py [--packages P] [--files F]
                                                                    [--rounds R]
"""

from __future__ import annotations

import argparse
import contextlib
import os
import select
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Self

sys.path[0] = str(Path(__file__).resolve().parent.parent)  # not bench/ (its mmap.py)

from trustdb.db import TrustDB
from trustdb.model import InodeKey
from trustdb.service.installer_ask import ASK_TIMEOUT_S, SEQ
from trustdb.service.installers import InstallerTrust

ASK_EVERY_S = 0.01
BASELINE_S = 2.0
SPEC = """\
Name: tdbig{n}
Version: 1.0
Release: 1
Summary: a package of many small executable files
License: MIT
AutoReqProv: no
%global debug_package %{{nil}}
%global __os_install_post %{{nil}}
%description
bench package
%install
mkdir -p %{{buildroot}}/opt/tdbig{n}
for i in $(seq {files}); do printf '#!/bin/sh\\necho {n}-%s\\n' $i \
  > %{{buildroot}}/opt/tdbig{n}/f$i; chmod 755 %{{buildroot}}/opt/tdbig{n}/f$i; done
%files
/opt/tdbig{n}
"""


class Engine:
    """What InstallerTrust needs of the service engine: the database and the kernel's keys."""

    def __init__(self, db: TrustDB, keys: set[InodeKey]) -> None:
        self.db = db
        self.key_sink = keys

    def refresh(self) -> None:
        pass


def build_packages(dest: Path, packages: int, files: int) -> list[Path]:
    out = []
    for n in range(packages):
        top = dest / f"big{n}"
        top.mkdir()
        spec = top / "big.spec"
        spec.write_text(SPEC.format(n=n, files=files))
        subprocess.run(["rpmbuild", "-bb", "--quiet", "--define", f"_topdir {top}", str(spec)],
                       check=True, capture_output=True)
        out += list((top / "RPMS").rglob("*.rpm"))
    return out


def rpm(root: Path, *args: str) -> None:
    subprocess.run(["rpm", "--root", str(root), "--dbpath", "/rpmdb", *args], check=True,
                   capture_output=True)


class Loop:
    """The daemon's main loop for InstallerTrust, timing each step."""

    def __init__(self, trust: InstallerTrust) -> None:
        self.trust = trust
        self.steps: list[float] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        poller = select.poll()
        for fd in self.trust.filenos():
            poller.register(fd, select.POLLIN)
        while not self._stop.is_set():
            ready = {fd for fd, _ in poller.poll(50)}
            started = time.perf_counter()
            self.trust.on_ready(ready)
            self.trust.sync_windows()
            self.steps.append(time.perf_counter() - started)

    def __enter__(self) -> Self:
        self._thread.start()
        return self

    def __exit__(self, *_: object) -> None:
        self._stop.set()
        self._thread.join()


@contextlib.contextmanager
def asking(trust: InstallerTrust) -> Iterator[list[float]]:
    """Questions every ASK_EVERY_S on the handler's end of the channel; yields latencies."""
    sock = trust._ask_handler  # the handler's end (in the daemon, the handler inherits it)
    latencies: list[float] = []
    stop = threading.Event()

    def ask() -> None:
        seq = 0
        while not stop.is_set():
            seq += 1
            started = time.perf_counter()
            sock.send(seq.to_bytes(SEQ, "big") + os.urandom(32))
            while True:
                if not select.select([sock], [], [], ASK_TIMEOUT_S)[0]:
                    latencies.append(float("inf"))  # the handler would deny, and give up
                    return
                if sock.recv(64)[:SEQ] == seq.to_bytes(SEQ, "big"):
                    break
            latencies.append(time.perf_counter() - started)
            time.sleep(ASK_EVERY_S)

    thread = threading.Thread(target=ask, daemon=True)
    thread.start()
    try:
        yield latencies
    finally:
        stop.set()
        thread.join()


def one_round(trust: InstallerTrust, root: Path, small: Path, db: TrustDB,
              importing: bool) -> tuple[float, float, float]:
    """(longest loop step, median and max question latency) over one rpm run, or over the same
    time with nothing to import."""
    with Loop(trust) as loop, asking(trust) as latencies:
        time.sleep(0.2)
        if importing:
            rpm(root, "-i", "--nodeps", "--replacepkgs", "--nopost", str(small))
            while any("@" in s.label for s in db.sources()):
                time.sleep(0.01)
        time.sleep(0.5 if importing else BASELINE_S)
    return max(loop.steps), statistics.median(latencies), max(latencies)


PHASES: dict[str, float] = {}
"""The longest single call of each part of the import (where a long step comes from)."""


def _timed(owner: object, name: str) -> None:
    inner = getattr(owner, name)

    def timed(*args: object, **kwargs: object) -> object:
        started = time.perf_counter()
        try:
            return inner(*args, **kwargs)
        finally:
            took = time.perf_counter() - started
            PHASES[name] = max(PHASES.get(name, 0.0), took)

    setattr(owner, name, timed)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--packages", type=int, default=20)
    ap.add_argument("--files", type=int, default=2000)
    ap.add_argument("--rounds", type=int, default=3)
    args = ap.parse_args()
    from tests.vm.test_service_vm import build_test_rpm

    work = Path(tempfile.mkdtemp(prefix="td-rpmexit-"))
    mnt = work / "root"
    mnt.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=2g,nr_inodes=2m", "tdbench", str(mnt)],
                   check=True)
    trust = None
    try:
        print(f"building {args.packages} packages x {args.files} files ...", flush=True)
        big = build_packages(work, args.packages, args.files)
        small = build_test_rpm(work, "tdhand", "by-hand", "/opt/tdhand")
        rpm(mnt, "--initdb")
        rpm(mnt, "-i", "--nodeps", *map(str, big))
        db = TrustDB.open(work / "db", write=True)
        from trustdb_importers.rpm import RpmDbImporter

        started = time.perf_counter()
        imp = RpmDbImporter(root=str(mnt), dbpath="/rpmdb")
        db.replace_source(imp.source().label, imp.source().kind, imp.collect(db.digest_cache()))
        print(f"first import (cold cache): {time.perf_counter() - started:.2f} s", flush=True)
        rpm_key = InodeKey.from_stat(os.stat(os.path.realpath(shutil.which("rpm") or "rpm")))
        trust = InstallerTrust(filesystems=lambda: [str(mnt)], own_pid=-1)
        trust.start(Engine(db, {rpm_key}))  # type: ignore[arg-type]
        from trustdb.service.handheld import RpmdbCheck
        from trustdb_importers.rpm import RpmDbImporter as Importer

        for owner, name in ((RpmdbCheck, "finish"), (RpmdbCheck, "_chunk"),
                            (Importer, "read_headers"), (Importer, "verify")):
            _timed(owner, name)
        rows: dict[bool, list[tuple[float, float, float]]] = {False: [], True: []}
        for _ in range(args.rounds):
            for importing in (False, True):
                rows[importing].append(one_round(trust, mnt, small, db, importing))
                step, median, worst = rows[importing][-1]
                print(f"  {'import' if importing else 'idle':6}: step {step * 1000:7.1f} ms, "
                      f"latency {median * 1000:6.2f} / {worst * 1000:7.1f} ms", flush=True)
        load = os.getloadavg()[0]
        for importing, label in ((False, "no import (baseline)"), (True, "rpm exit import")):
            r = rows[importing]
            print(f"{label:22}: longest loop step {max(x[0] for x in r) * 1000:8.1f} ms; "
                  f"question latency median {statistics.median(x[1] for x in r) * 1000:7.2f} ms,"
                  f" max {max(x[2] for x in r) * 1000:8.1f} ms")
        print("longest call in the import: " + ", ".join(
            f"{name} {took * 1000:.1f} ms" for name, took in PHASES.items()))
        base = max(x[2] for x in rows[False])
        worst = max(x[2] for x in rows[True])
        print(f"rpmdb: {args.packages * args.files} files; max latency ratio import/baseline "
              f"x{worst / base:.1f}; ask timeout {ASK_TIMEOUT_S:.0f} s; load {load:.1f}")
    finally:
        if trust is not None:
            trust.stop()
        subprocess.run(["umount", "-l", str(mnt)], check=False)
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
