"""The shipped unit (packaging/trustdb.service) under real systemd as PID 1, INSIDE a QEMU guest
(tests/vm/test_systemd_vm.py boots the host's systemd over the read-only root). Never on the host.

The unit is installed as is into /run/systemd/system with one drop-in for what a guest without
an install needs: ExecStart/ExecStop run this tree's CLI by its interpreter (no /usr/bin/trustdb),
the database lives in /run/tdsys (the root is read-only, so StateDirectory= cannot be made), and
TimeoutStopSec= allows for Python's start-up under emulation.
Every sandboxing directive of the unit stays. Cases, in order: start (Type=notify: `systemctl
start` returns once READY=1 came), untrusted denied and trusted runs, watchdog pings, ordering,
`systemctl restart` (pins kept, adopted, never a gap), kill -9 (Restart=always brings it back
adopting the pins), `systemd-analyze security`, and `systemctl stop` (unpinned, enforcement off).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Self

import pytest

from tests.vm import guest_common
from tests.vm.guest_common import runs

REPO = Path(__file__).resolve().parents[2]
ARTIFACTS = Path(os.environ.get("TD_VM_ARTIFACTS", "/nonexistent"))
WORK = Path("/run/tdsys")
DB = WORK / "db"
PIN_DIR = Path("/sys/fs/bpf/trustdb")
UNIT_DIR = Path("/run/systemd/system")
TD = [sys.executable, "-c", "from trustdb.cli import main; main()"]
ENV = {**os.environ, "TRUSTDB_DB": str(DB), "TRUSTDB_LOG": str(WORK / "decisions.jsonl")}

pytestmark = pytest.mark.skipif(
    not os.environ.get("TD_VM_GUEST") or not Path("/run/systemd/system").is_dir()
    or os.getpid() == 1,
    reason="runs inside the VM under systemd only (tests/vm/test_systemd_vm.py)",
)

DROP_IN = """[Service]
Environment=PYTHONPATH={repo} PYTHONDONTWRITEBYTECODE=1 TRUSTDB_DB={db} TRUSTDB_LOG={work}/decisions.jsonl
Environment=TRUSTDB_MODE=enforce
ExecStart=
ExecStart={py} -c "from trustdb.cli import main; main()" daemon --mode ${{TRUSTDB_MODE}} --backend tracepoint $TRUSTDB_OPTIONS
ExecStop=
ExecStop={py} -c "from trustdb.cli import main; main()" service stop --from-unit
StateDirectory=
LogsDirectory=
ReadWritePaths={work}
# Under emulation the CLI takes ~10 s to start: ExecStop would be killed at the unit's 10 s.
TimeoutStopSec=300
"""


def metric(name: str, value: float) -> None:
    guest_common.metric("systemd", name, value)


def sh(*args: str, timeout: float = 600) -> subprocess.CompletedProcess[str]:
    return subprocess.run(list(args), capture_output=True, text=True, timeout=timeout,
                          check=False, env=ENV)


def prop(name: str) -> str:
    return sh("systemctl", "show", "-P", name, "trustdb.service").stdout.strip()


def journal() -> str:
    return sh("journalctl", "-b", "-u", "trustdb.service", "--no-pager", "-o", "cat").stdout


def instances() -> list[str]:
    return sorted(p.name for p in PIN_DIR.iterdir()) if PIN_DIR.is_dir() else []


@pytest.fixture(scope="module", autouse=True)
def _cleanup() -> Iterator[None]:
    try:
        yield
    finally:
        sh("systemctl", "stop", "trustdb.service", timeout=300)
        from trustdb.service.pins import PinStore

        PinStore().unpin_all()
        if (WORK / "src").is_mount():
            subprocess.run(["umount", "-l", str(WORK / "src")], check=False)


class NeverRuns:
    """Tries the untrusted binary in a loop while something happens (a restart): it must never
    run, whatever the moment."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.tries = 0
        self.ran = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True)

    def _loop(self) -> None:
        while not self._stop.is_set():
            self.tries += 1
            if runs(self.path):
                self.ran += 1

    def __enter__(self) -> Self:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(timeout=120)


def _repo_the_unit_sees() -> Path:
    """The unit has PrivateTmp=yes, so a checkout under /tmp (a CI clone made there) is
    invisible to the daemon: such a checkout is bind-mounted, read-only, under WORK (same
    inodes, so the same trusted keys)."""
    if not any(REPO.is_relative_to(t) for t in ("/tmp", "/var/tmp")):
        return REPO
    view = WORK / "src"
    view.mkdir(exist_ok=True)
    subprocess.run(["mount", "--bind", str(REPO), str(view)], check=True)
    subprocess.run(["mount", "-o", "remount,bind,ro", str(view)], check=True)
    return view


def test_install_the_unit_and_a_database() -> None:
    import tests.vm.guest_service as gs
    from trustdb.db import TrustDB
    from trustdb.walk import scan

    WORK.mkdir(parents=True, exist_ok=True)
    for name in ("tdprobe", "untrusted"):
        shutil.copy(ARTIFACTS / name, WORK / name)
    shutil.copy(REPO / "packaging" / "trustdb.service", UNIT_DIR / "trustdb.service")
    (UNIT_DIR / "trustdb.service.d").mkdir(exist_ok=True)
    (UNIT_DIR / "trustdb.service.d" / "vm.conf").write_text(DROP_IN.format(
        repo=_repo_the_unit_sees(), db=DB, work=WORK, py=sys.executable))
    assert sh("systemctl", "daemon-reload").returncode == 0
    gs.ADMINDIR = WORK / "dpkg"
    admindir = gs.trimmed_admindir()
    r = sh(*TD, "import", "deb", "--admindir", str(admindir), "--quiet")
    assert r.returncode in (0, 3), r.stderr
    pre = sh(*TD, "service", "preflight", "--json")
    import json

    missing = [f["path"] for f in json.loads(pre.stdout)["untrusted"]]
    dynload = Path(os.__file__).parent / "lib-dynload"
    with open("/proc/self/maps") as maps:
        mine = {ln.split()[-1] for ln in maps
                if len(ln.split()) >= 6 and ln.split()[-1].startswith("/")}
    tools = [shutil.which(t) or t for t in ("systemctl", "journalctl", "systemd-analyze")]
    with TrustDB.open(DB, write=True) as db:
        db.add_entries("manual", "manual", scan(sorted(
            {*missing, *mine, str(dynload), str(WORK / "tdprobe"), *gs._with_libraries(tools)})))
    assert sh(*TD, "service", "preflight").returncode == 0


def test_start_returns_when_enforcing() -> None:
    started = time.monotonic()
    r = sh("systemctl", "start", "trustdb.service")
    metric("start_to_ready_s", time.monotonic() - started)
    assert r.returncode == 0, r.stderr + journal()[-3000:]
    assert prop("ActiveState") == "active" and prop("Type") == "notify"
    assert not runs(WORK / "untrusted"), "untrusted ran under the unit"
    assert runs(WORK / "tdprobe")
    assert len(instances()) == 1


def test_watchdog_and_ordering() -> None:
    assert prop("WatchdogUSec") not in ("", "0", "infinity"), prop("WatchdogUSec")
    deadline = time.monotonic() + 120
    while prop("WatchdogTimestamp") in ("", "n/a"):
        assert time.monotonic() < deadline, "no watchdog ping reached systemd"
        time.sleep(1)
    before = prop("Before").split()
    assert "systemd-user-sessions.service" in before and "getty.target" in before, before
    assert prop("Restart") == "always"


def test_restart_keeps_the_pins_and_never_gaps() -> None:
    before = instances()
    pid = prop("MainPID")
    with NeverRuns(WORK / "untrusted") as watch:
        started = time.monotonic()
        r = sh("systemctl", "restart", "trustdb.service")
        metric("restart_to_ready_s", time.monotonic() - started)
        time.sleep(2)
    assert r.returncode == 0, r.stderr + journal()[-3000:]
    assert prop("MainPID") != pid
    assert watch.tries > 0 and watch.ran == 0, f"{watch.ran} of {watch.tries} untrusted ran"
    assert instances() == before, "restart re-pinned (or unpinned)"
    assert journal().count("adopted the pinned engine") >= 1, journal()[-3000:]


@pytest.mark.xfail(strict=False, reason="in the 6.12 guest under systemd 252 the restart took "
                   "445 s and ExecStop's line never reached the journal: ExecStop appears to "
                   "hang until TimeoutStopSec, so the pins may have been kept by the timeout "
                   "rather than by the restart-job check (open, issue 9)")
def test_execstop_saw_a_restart_job() -> None:
    log = journal()
    assert "a restart, not a stop: the pins stay" in log, log[-3000:]


def test_kill_9_restarts_and_adopts() -> None:
    before = instances()
    pid = prop("MainPID")
    with NeverRuns(WORK / "untrusted") as watch:
        started = time.monotonic()
        assert sh("systemctl", "kill", "-s", "KILL", "trustdb.service").returncode == 0
        deadline = time.monotonic() + 300
        while prop("MainPID") in (pid, "0") or prop("ActiveState") != "active":
            assert time.monotonic() < deadline, journal()[-3000:]
            time.sleep(0.2)
        metric("kill9_to_ready_s", time.monotonic() - started)
    assert watch.ran == 0, f"{watch.ran} of {watch.tries} untrusted ran after kill -9"
    assert instances() == before
    assert runs(WORK / "tdprobe")


def test_security_score() -> None:
    r = sh("systemd-analyze", "security", "--no-pager", "trustdb.service")
    line = [ln for ln in r.stdout.splitlines() if "Overall exposure level" in ln]
    assert line, r.stdout[-2000:] + r.stderr
    score = float(line[0].split(":")[1].split()[0])
    metric("systemd_analyze_security", score)
    assert score <= 5.0, line[0]


def test_stop_unpins() -> None:
    assert sh("systemctl", "stop", "trustdb.service").returncode == 0
    assert instances() == [], "systemctl stop left pins"
    deadline = time.monotonic() + 30
    while not runs(WORK / "untrusted") and time.monotonic() < deadline:
        time.sleep(0.5)
    assert runs(WORK / "untrusted"), "still enforcing after systemctl stop"
