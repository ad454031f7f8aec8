"""The service's per-uid and per-cgroup modes on the host (trustdb.service.modes).

Host-safe: nothing is attached. The tracepoint object is loaded (scoped to a cgroup this test
made) only for its real `mode_uids` and `mode_cgroups` maps; the cgroups are made here and
removed afterwards. The kernel's own per-task choice (bpf/modes.bpf.h) is tested system-wide
in a guest: tests/vm/guest_modes.py.
"""

from __future__ import annotations

import os
import struct
import subprocess
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from types import MappingProxyType

import pytest

from tests.engine.conftest import CGROUP2, _kill_and_remove
from trustdb.abi import CEvent, Hook, Mode, ModeRule, Reason, Verdict
from trustdb.backends.interface import EngineConfig, Scope
from trustdb.backends.tracepoint import TracepointBackend
from trustdb.events import Decision
from trustdb.events import decision as decision_module
from trustdb.policy.model import Enforcement, ServiceRules
from trustdb.service.modes import ModeMaps, TaskModes, resolve
from trustdb.session import DenialReporter

pytestmark = [pytest.mark.root, pytest.mark.bpf]

NOBODY = 65534
AUDIT, ENFORCE = Enforcement.AUDIT, Enforcement.ENFORCE


@pytest.fixture
def tree() -> Iterator[Path]:
    """trustdb-test-*/{audit/inner, audit/strict, plain, deleg (owned by nobody)}."""
    if os.geteuid() != 0 or not (CGROUP2 / "cgroup.procs").exists():
        pytest.fail(f"needs root and cgroup v2 at {CGROUP2}")
    top = CGROUP2 / f"trustdb-test-{uuid.uuid4().hex[:10]}"
    try:
        for sub in ("", "audit", "audit/inner", "audit/strict", "plain", "deleg"):
            (top / sub).mkdir()
        os.chown(top / "deleg", NOBODY, NOBODY)
        os.chown(top / "deleg" / "cgroup.procs", NOBODY, NOBODY)
        yield top
    finally:
        _kill_and_remove(top)


def _rules(top: Path, **extra: Enforcement) -> ServiceRules:
    rel = "/" + top.name
    cgroups = {f"{rel}/audit": AUDIT, f"{rel}/audit/strict": ENFORCE, f"{rel}/deleg": AUDIT,
               f"{rel}/later": AUDIT, **{f"{rel}/{k}": v for k, v in extra.items()}}
    return ServiceRules(mode=ENFORCE, per_uid=MappingProxyType({1001: AUDIT}),
                        per_cgroup=MappingProxyType(cgroups))


def test_resolve_refuses_delegated_audit_cgroups_and_waits_for_missing_ones(tree: Path) -> None:
    rel = "/" + tree.name
    r = resolve(_rules(tree), Mode.ENFORCE, CGROUP2)
    by_path = {p: (i, m) for i, (p, m) in r.cgroups.items()}
    assert by_path[f"{rel}/audit"] == ((tree / "audit").stat().st_ino, Mode.AUDIT)
    assert by_path[f"{rel}/audit/strict"][1] == Mode.ENFORCE
    # A cgroup its owner (not root) can move its own processes into never gets audit.
    assert [p for p, _ in r.refused] == [f"{rel}/deleg"]
    assert "delegated" in r.refused[0][1]
    assert r.missing == (f"{rel}/later",)
    assert f"cgroup {rel}/later: not applied: does not exist (yet)" in r.lines()
    # The cgroup appears (a service started after the daemon): the next resolve has it.
    (tree / "later").mkdir()
    again = resolve(_rules(tree), Mode.ENFORCE, CGROUP2)
    assert (tree / "later").stat().st_ino in again.cgroups and not again.missing


def test_resolve_refuses_odd_paths(tree: Path) -> None:
    rules = ServiceRules(per_cgroup=MappingProxyType({
        f"/{tree.name}/../x": AUDIT, "/" + "/".join(["d"] * 40): AUDIT}))
    r = resolve(rules, Mode.ENFORCE, CGROUP2)
    assert not r.cgroups and len(r.refused) == 2


@pytest.fixture
def maps(tree: Path) -> Iterator[tuple[ModeMaps, TracepointBackend]]:
    """The real kernel maps of a loaded (never attached) tracepoint object."""
    backend = TracepointBackend()
    backend.load(EngineConfig(mode=Mode.ENFORCE, scope=Scope.for_cgroup(tree),
                              events_bytes=4096, max_entries=16))
    try:
        yield ModeMaps(backend.map("mode_uids"), backend.map("mode_cgroups")), backend
    finally:
        backend.detach()


def _contents(m: ModeMaps) -> tuple[dict[int, int], dict[int, int]]:
    ukeys, ckeys = m.uids.keys(), m.cgroups.keys()  # BpfMap: one bpf() call per key
    uids = {struct.unpack("<I", k)[0]: m.uids.lookup(k)[0] for k in ukeys}  # type: ignore[index]
    cgs = {struct.unpack("<Q", k)[0]: m.cgroups.lookup(k)[0] for k in ckeys}  # type: ignore[index]
    return uids, cgs


def test_mode_maps_hold_exactly_the_resolved_rules(
        tree: Path, maps: tuple[ModeMaps, TracepointBackend]) -> None:
    m, _ = maps
    assert m.apply(resolve(_rules(tree), Mode.ENFORCE, CGROUP2))
    uids, cgs = _contents(m)
    assert uids == {1001: int(Mode.AUDIT)}
    assert cgs == {(tree / "audit").stat().st_ino: int(Mode.AUDIT),
                   (tree / "audit" / "strict").stat().st_ino: int(Mode.ENFORCE)}
    assert not m.apply(resolve(_rules(tree), Mode.ENFORCE, CGROUP2))  # nothing changed
    # A reload without the uid rule and with the plain cgroup listed: stale entries go.
    rules = _rules(tree, plain=AUDIT)
    rules = ServiceRules(mode=rules.mode, per_cgroup=rules.per_cgroup)
    assert m.apply(resolve(rules, Mode.ENFORCE, CGROUP2))
    uids, cgs = _contents(m)
    assert uids == {} and (tree / "plain").stat().st_ino in cgs
    assert decision_module.CGROUP_NAMES[(tree / "plain").stat().st_ino] == f"/{tree.name}/plain"


def _sleeper(cgroup: Path, uid: int = 0) -> subprocess.Popen[bytes]:
    """`sleep` in `cgroup` as `uid` (moved in before it drops root)."""
    return subprocess.Popen(
        ["sh", "-c", (f"echo $$ > {cgroup}/cgroup.procs && exec setpriv --reuid {uid} "
                      f"--regid {uid} --clear-groups sleep 30")])


def _wait_uid(pid: int, uid: int) -> None:
    import time

    for _ in range(200):
        try:
            with open(f"/proc/{pid}/status") as f:
                ok = any(line.startswith("Uid:") and line.split()[1] == str(uid) for line in f)
            if ok and Path(f"/proc/{pid}/exe").resolve().name == "sleep":
                return
        except OSError:
            pass
        time.sleep(0.02)
    pytest.fail(f"pid {pid} never became uid {uid}")


def test_task_modes_choose_as_the_kernel_does(
        tree: Path, maps: tuple[ModeMaps, TracepointBackend]) -> None:
    """The first-seen handler's copy of the choice: the deepest listed cgroup, then the uid
    (a cgroup rule beats a uid rule), then the default; a vanished task is enforced."""
    m, _ = maps
    m.apply(resolve(_rules(tree), Mode.ENFORCE, CGROUP2))
    modes = TaskModes(m.uids, m.cgroups, Mode.ENFORCE, CGROUP2)
    cases = [(tree / "audit" / "inner", 0, Mode.AUDIT),  # below a listed audit cgroup
             (tree / "audit" / "strict", 1001, Mode.ENFORCE),  # deeper enforce beats both
             (tree / "plain", 1001, Mode.AUDIT),  # no cgroup rule: the uid's
             (tree / "plain", 0, Mode.ENFORCE),  # neither: the default
             (tree / "deleg", 0, Mode.ENFORCE)]  # refused: never audit
    procs = [(_sleeper(cg, uid), uid, want) for cg, uid, want in cases]
    try:
        for proc, uid, want in procs:
            _wait_uid(proc.pid, uid)
        got = [modes.mode_of(p.pid) for p, _, _ in procs]
        assert got == [want for _, _, want in procs]
    finally:
        for proc, _, _ in procs:
            proc.kill()
            proc.wait()
    assert modes.mode_of(procs[0][0].pid) == Mode.ENFORCE  # gone: fail closed


def test_a_setuid_root_program_of_an_audit_user_is_enforced_when_root_is(
        tree: Path, maps: tuple[ModeMaps, TracepointBackend]) -> None:
    """Default audit, uid 1001 in audit, root listed as enforce: a program uid 1001 runs with
    euid 0 (setuid root) is judged as root, enforced, as the kernel judges it (ENFORCE is 0:
    a lookup that found it must not read as "no rule")."""
    m, _ = maps
    rules = ServiceRules(mode=AUDIT, per_uid=MappingProxyType({1001: AUDIT, 0: ENFORCE}))
    m.apply(resolve(rules, Mode.AUDIT, CGROUP2))
    modes = TaskModes(m.uids, m.cgroups, Mode.AUDIT, CGROUP2)
    proc = subprocess.Popen(
        ["sh", "-c", (f"echo $$ > {tree / 'plain'}/cgroup.procs && exec setpriv --ruid 1001 "
                      "--euid 0 sleep 30")])
    try:
        for _ in range(200):
            with open(f"/proc/{proc.pid}/status") as f:
                if any(line.split()[:3] == ["Uid:", "1001", "0"] for line in f):
                    break
            time.sleep(0.02)
        else:
            pytest.fail("the setuid-like task never had ruid 1001, euid 0")
        assert modes.mode_of(proc.pid) == Mode.ENFORCE
    finally:
        proc.kill()
        proc.wait()


def test_decisions_name_the_rule() -> None:
    ev = CEvent(pid=7, tgid=7, uid=1001, hook=int(Hook.EXEC), verdict=int(Verdict.AUDIT_DENY),
                mode=int(Mode.AUDIT), backend=1, reason=int(Reason.UNTRUSTED),
                path=b"/tmp/evil", mode_rule=int(ModeRule.UID))
    d = Decision.from_event(ev, exe_of=lambda _: "")
    assert d.mode_rule == "uid 1001"
    assert Decision.from_dict(d.to_dict()) == d
    line = DenialReporter(db=Path("/nonexistent")).line(d)
    assert "would deny (audit: uid 1001) exec of /tmp/evil" in line, line
    decision_module.CGROUP_NAMES[4242] = "/system.slice/legacy.service"
    ev.mode_rule, ev.mode_cgroup = int(ModeRule.CGROUP), 4242
    ev.hook, ev.reason, ev.path = int(Hook.TAMPER), int(Reason.MODE_MOVE), b"systemd"
    d = Decision.from_event(ev, exe_of=lambda _: "")
    line = DenialReporter(db=Path("/nonexistent")).line(d)
    assert "moved by systemd into cgroup /system.slice/legacy.service" in line, line
    ev.mode_rule = int(ModeRule.DEFAULT)
    assert "mode_rule" not in Decision.from_event(ev, exe_of=lambda _: "").to_dict()
