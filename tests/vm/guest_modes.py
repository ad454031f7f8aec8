"""The service's per-uid and per-cgroup modes, system-wide, INSIDE a QEMU guest (driven by
tests/vm/test_modes_vm.py). Never on the host: the daemon enforces on every task.

One daemon (`--mode enforce --policy modes.toml`): uid 1001 is in audit, /tdm-audit is in
audit with an enforced child /tdm-audit/strict, /tdm-deleg (owned by uid 1001) is listed as
audit and must be refused, /tdm-later is listed before it exists. Each case runs the same
untrusted binary from a small trusted Python launcher that moves itself into a cgroup and
drops to a uid, then execs it. A module finalizer stops the daemon and unpins everything.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.vm.guest_service import (
    ARTIFACTS,
    DB,
    LOG,
    PIN_DIR,
    WORK,
    Daemon,
    copy,
    td,
    trimmed_admindir,
)

CGROUP = Path("/sys/fs/cgroup")
POLICY = WORK / "modes.toml"
USER = 1001
STATE: dict[str, Daemon] = {}
STATE_FILES: dict[str, Path] = {}

pytestmark = pytest.mark.skipif(
    not (ARTIFACTS / "untrusted").exists() or not os.environ.get("TD_VM_GUEST"),
    reason="runs inside the VM only (tests/vm/test_modes_vm.py)",
)

POLICY_TEXT = """\
[policy]
name = "modes-test"
[service]
mode = "enforce"
[service.uids]
{uids}
[service.cgroups]
"/tdm-audit" = "audit"
"/tdm-audit/strict" = "enforce"
"/tdm-deleg" = "audit"
"/tdm-later" = "audit"
"""

LAUNCH = """\
import os, sys
cgroup, uid, prog = sys.argv[1], int(sys.argv[2]), sys.argv[3]
if cgroup:
    with open(cgroup + "/cgroup.procs", "w") as f:
        f.write(str(os.getpid()))
if uid:
    os.setgroups([]); os.setgid(uid); os.setuid(uid)
os.execv(prog, [prog])
"""


def write_policy(uids: str = f'"{USER}" = "audit"') -> None:
    POLICY.write_text(POLICY_TEXT.format(uids=uids))


def launch(prog: Path, cgroup: str = "", uid: int = 0) -> bool:
    """Whether `prog` ran to a clean exit from cgroup `cgroup` as `uid` (lsm: EPERM at exec,
    the launcher exits 1; tracepoint: SIGKILL)."""
    where = str(CGROUP / cgroup.lstrip("/")) if cgroup else ""
    r = subprocess.run([sys.executable, "-c", LAUNCH, where, str(uid), str(prog)],
                       capture_output=True, text=True, timeout=300, check=False)
    return r.returncode == 0


def daemon() -> Daemon:
    d = STATE.get("daemon")
    assert d is not None, "no daemon running (an earlier case failed)"
    return d


def wait_line(text: str, timeout: float = 60) -> str:
    """The daemon's stderr once it holds `text`."""
    d = daemon()
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        err = d.err_path.read_text()
        if text in err:
            return err
        assert d.proc.poll() is None, f"daemon exited: {d.stderr()}"
        time.sleep(0.2)
    pytest.fail(f"no {text!r} in the daemon's stderr: {d.stderr()}")


def log_records() -> list[dict[str, object]]:
    if not LOG.exists():
        return []
    return [json.loads(line) for line in LOG.read_text().splitlines() if line.strip()]


@pytest.fixture(scope="module", autouse=True)
def _cleanup() -> Iterator[None]:
    WORK.mkdir(parents=True, exist_ok=True)
    try:
        yield
    finally:
        d = STATE.get("daemon")
        if d is not None and d.proc.poll() is None:
            d.proc.kill()
            d.proc.wait()
        from trustdb.service.pins import PinStore

        PinStore().unpin_all()  # nothing system-wide survives the suite, whatever failed
        for name in ("tdm-audit/strict", "tdm-audit/late-child", "tdm-audit", "tdm-plain",
                     "tdm-deleg", "tdm-later"):
            try:
                (CGROUP / name).rmdir()
            except OSError:
                pass


def test_setup_database_and_cgroups() -> None:
    r = td("import", "deb", "--admindir", str(trimmed_admindir()), "--quiet")
    assert r.returncode in (0, 3), r.stderr
    dynload = Path(os.__file__).parent / "lib-dynload"
    with open("/proc/self/maps") as maps:
        mine = {ln.split()[-1] for ln in maps
                if len(ln.split()) >= 6 and ln.split()[-1].startswith("/")}
    from trustdb.db import TrustDB
    from trustdb.walk import scan

    wanted = {*mine, str(dynload), os.path.realpath(sys.executable), str(ARTIFACTS / "tdprobe")}
    for _ in range(4):  # what a person does with the preflight list: trust it, until clean
        with TrustDB.open(DB, write=True) as db:
            db.add_entries("manual", "manual", scan(sorted(wanted)))
        r = td("service", "preflight", "--json")
        if r.returncode == 0:
            break
        wanted |= {f["path"] for f in json.loads(r.stdout)["untrusted"]}
    assert r.returncode == 0, r.stdout[-2000:]
    STATE_FILES["evil"] = copy(ARTIFACTS / "untrusted", "modes-evil")
    os.chmod(WORK, 0o755)
    for name in ("tdm-audit", "tdm-audit/strict", "tdm-plain", "tdm-deleg"):
        (CGROUP / name).mkdir(exist_ok=True)
    os.chown(CGROUP / "tdm-deleg", USER, USER)
    os.chown(CGROUP / "tdm-deleg" / "cgroup.procs", USER, USER)
    write_policy()


def evil() -> Path:
    return STATE_FILES.get("evil") or WORK / "modes-evil"


def test_daemon_starts_and_says_which_modes_are_in_force() -> None:
    d = Daemon("enforce", "--policy", str(POLICY))
    STATE["daemon"] = d
    d.wait_for("READY=1")
    err = wait_line("trustdb: modes: ")
    line = next(ln for ln in err.splitlines() if ln.startswith("trustdb: modes: "))
    assert f"uid {USER}: audit" in line and "cgroup /tdm-audit: audit" in line, line
    assert "cgroup /tdm-audit/strict: enforce" in line, line
    assert "cgroup /tdm-deleg: not applied" in line and "delegated" in line, line
    assert "cgroup /tdm-later: not applied: does not exist (yet)" in line, line
    status = json.loads(td("status", "--json").stdout)
    (engine,) = [e for e in status["engines"] if e["kind"] == "daemon"]
    assert f"uid {USER}: audit" in engine["modes"], engine
    r = td("service", "status")
    assert f"mode: uid {USER}: audit" in r.stdout, r.stdout
    r = td("policy", "show", str(POLICY))
    assert "in force (the running daemon)" in r.stdout and f"uid {USER}: audit" in r.stdout, \
        r.stdout


def test_root_is_denied_the_untrusted_binary() -> None:
    assert not launch(evil()), "root (enforce by default) ran untrusted code"
    assert launch(ARTIFACTS / "tdprobe"), "the trusted binary was denied"


def test_audit_uid_runs_it_and_the_log_says_audit() -> None:
    assert launch(evil(), uid=USER), f"uid {USER} (audit) was denied"
    wait_line(f"would deny (audit: uid {USER}) exec of {evil()}")
    time.sleep(0.5)
    records = [r for r in log_records() if r.get("path") == str(evil())]
    assert any(r["mode"] == "audit" and r.get("mode_rule") == f"uid {USER}" and
               r["uid"] == USER for r in records), records


def test_audit_cgroup_runs_it_and_the_move_is_logged() -> None:
    assert launch(evil(), cgroup="/tdm-audit"), "a task in the audit cgroup was denied"
    wait_line("would deny (audit: cgroup /tdm-audit) exec of")
    wait_line("into cgroup /tdm-audit, whose mode is audit")


def test_a_child_of_an_audit_cgroup_made_later_inherits_it() -> None:
    (CGROUP / "tdm-audit" / "late-child").mkdir(exist_ok=True)
    assert launch(evil(), cgroup="/tdm-audit/late-child")


def denials() -> int:
    return daemon().err_path.read_text().count(f"denied exec of {evil()}") + \
        daemon().err_path.read_text().count("denied (cgroup /tdm-audit/strict: enforce) exec of")


def test_an_enforced_child_beats_the_audit_cgroup_and_the_audit_uid() -> None:
    """Denied at its open by the first-seen handler (the same choice, from the same maps) or
    at exec by the kernel; either way the daemon says so."""
    before = denials()
    assert not launch(evil(), cgroup="/tdm-audit/strict", uid=USER)
    deadline = time.monotonic() + 60
    while denials() == before and time.monotonic() < deadline:
        time.sleep(0.2)
    assert denials() > before, daemon().stderr()


def test_an_unlisted_cgroup_is_enforced() -> None:
    (CGROUP / "tdm-plain").mkdir(exist_ok=True)
    assert not launch(evil(), cgroup="/tdm-plain")


def test_a_delegated_cgroup_never_gets_audit() -> None:
    """uid 1001 owns /tdm-deleg: an audit rule there would let it choose audit for any of
    its processes. Root in it is enforced (the rule was refused)."""
    assert not launch(evil(), cgroup="/tdm-deleg")


def test_a_listed_cgroup_that_appears_later_gets_its_rule() -> None:
    (CGROUP / "tdm-later").mkdir(exist_ok=True)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        status = json.loads(td("status", "--json").stdout)
        modes = [m for e in status["engines"] if e["kind"] == "daemon" for m in e["modes"]]
        if "cgroup /tdm-later: audit" in " ".join(modes):
            break
        time.sleep(1)
    else:
        pytest.fail(f"/tdm-later never resolved: {modes}")
    assert launch(evil(), cgroup="/tdm-later")


def test_sighup_rereads_the_modes() -> None:
    write_policy(uids="")
    d = daemon()
    d.send(signal.SIGHUP)
    wait_line("reloaded the trust database")
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        status = json.loads(td("status", "--json").stdout)
        modes = [m for e in status["engines"] if e["kind"] == "daemon" for m in e["modes"]]
        if not any(m.startswith("uid ") for m in modes):
            break
        time.sleep(0.5)
    else:
        pytest.fail(f"the uid rule is still in force: {modes}")
    assert not launch(evil(), uid=USER), f"uid {USER} still in audit after the reload"


def test_stop_unpins() -> None:
    d = daemon()
    r = td("service", "stop")
    assert r.returncode == 0, r.stderr
    d.proc.wait(timeout=120)
    STATE.pop("daemon")
    assert not PIN_DIR.exists() or not any(PIN_DIR.iterdir())
    deadline = time.monotonic() + 15  # detaching is asynchronous under TCG
    while not launch(evil()) and time.monotonic() < deadline:
        time.sleep(0.5)
    assert launch(evil()), "still enforcing after `trustdb service stop`"
