"""No off switch from inside: every way a confined root process could lift its confinement fails.

Each case runs the same attempt unconfined first, where it must work (so the test proves the
attempt is real), then inside `trustdb run`, where it must fail and the untrusted binary must
still be killed. Real kernel, real BPF programs, as root; the run cgroups are removed after each
case (tests/engine/test_run.py:no_leftovers).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.engine import test_run as base
from tests.engine.test_run import TRUSTDB, run_confined, run_unconfined
from trustdb.confine import seccomp
from trustdb.db import TrustDB
from trustdb.hashing import hash_file

pytestmark = [pytest.mark.root, pytest.mark.bpf]

# The fixtures of test_run.py, shared (the database is built once per session).
trusted_db = base.trusted_db
run_env = base.run_env
untrusted = base.untrusted
no_leftovers = base.no_leftovers

PY = sys.executable


def _raw_bpf() -> str:
    """A python one-liner: BPF_PROG_GET_NEXT_ID through bpf(2); prints the errno name."""
    return (f"{PY} -c 'import ctypes,errno; l=ctypes.CDLL(None,use_errno=True); "
            "a=(ctypes.c_uint32*4)(); r=l.syscall(321, 11, a, 16); "
            "print(\"bpf\", errno.errorcode.get(ctypes.get_errno()) if r<0 else \"ok\")'")


def test_move_to_root_cgroup_then_exec(trusted_db: Path, run_env: dict[str, str],
                                       untrusted: Path) -> None:
    root = "/sys/fs/cgroup/unified/cgroup.procs"
    script = f"echo $$ > {root} && echo moved; {untrusted}; echo rc=$?"
    # Unconfined the shell is already in the root cgroup: the write works, the binary runs.
    assert run_unconfined(script, run_env).out == "moved\nrc=0\n"
    got = run_confined(trusted_db, script, run_env)
    assert "moved" not in got.out  # cgroupfs is read-only inside
    assert "rc=126" in got.out, got.err  # EPERM: the first-seen handler (137 without it)
    assert "denied exec of" in got.err


def test_unshare_cgroup_namespace(trusted_db: Path, run_env: dict[str, str],
                                  untrusted: Path) -> None:
    script = f"unshare -C {untrusted}; echo rc=$?"
    assert run_unconfined(script, run_env).out == "rc=0\n"
    got = run_confined(trusted_db, script, run_env)
    assert got.out == "rc=1\n", got.err  # unshare(2) is denied: EPERM
    assert "Operation not permitted" in got.err
    # And even a process that somehow changed namespaces keeps the BPF mark:
    got = run_confined(trusted_db, f"{untrusted}; echo rc=$?", run_env)
    assert got.out == "rc=126\n"  # EPERM from the first-seen handler


def test_supervisor_cannot_be_signalled_or_traced(trusted_db: Path, run_env: dict[str, str],
                                                  tmp_path: Path) -> None:
    """The supervisor's pid means nothing inside (another PID namespace), and ptrace is
    denied anyway. The run completes normally afterwards: the supervisor survived."""
    pidfile = tmp_path / "supervisor.pid"
    script = (
        f"while [ ! -s {pidfile} ]; do sleep 0.05; done; S=$(cat {pidfile}); "
        "kill -STOP $S; echo stop=$?; kill -9 $S; echo kill=$?; "
        f"{PY} -c 'import ctypes; l=ctypes.CDLL(None,use_errno=True); "
        "print(\"ptrace\", l.ptrace(16, int(open(\"" + str(pidfile) + "\").read()), 0, 0), "
        "ctypes.get_errno())'; "
        "ls /proc | grep -c '^[0-9]' ; exit 3"
    )
    proc = subprocess.Popen(
        [*TRUSTDB, "run", "--db", str(trusted_db), "--", "sh", "-c", script],
        env=run_env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=tmp_path)
    # Outside, the pid is real: signal 0 reaches it.
    os.kill(proc.pid, 0)
    pidfile.write_text(str(proc.pid))
    try:
        out, err = proc.communicate(timeout=60)
    finally:
        proc.kill()  # a hung run must not outlive the test
    assert proc.returncode == 3, err
    assert "stop=1" in out and "kill=1" in out, (out, err)
    assert "ptrace -1 1" in out  # EPERM
    # Inside /proc shows the confined tree only: sh, ls, grep (a handful, never the host's).
    assert int(out.strip().splitlines()[-1]) < 10


def test_bpf_is_denied_inside(trusted_db: Path, run_env: dict[str, str]) -> None:
    """No detaching programs, editing maps or switching to audit: bpf(2) itself is denied."""
    assert run_unconfined(_raw_bpf(), run_env).out.strip() in ("bpf ok", "bpf ENOENT")
    assert run_unconfined("bpftool prog list >/dev/null; echo rc=$?", run_env).out == "rc=0\n"
    got = run_confined(trusted_db, _raw_bpf(), run_env)
    assert got.out.strip() == "bpf EPERM", got.err
    got = run_confined(
        trusted_db,
        "bpftool prog list; echo prog=$?; bpftool map list; echo map=$?; ls /sys/fs/bpf | wc -l",
        run_env)
    assert "prog=255" in got.out or "prog=1" in got.out, got.out
    assert "map=255" in got.out or "map=1" in got.out, got.out
    assert got.out.strip().endswith("0")  # bpffs is covered: nothing pinned to reach


def test_switch_to_audit_from_inside(trusted_db: Path, run_env: dict[str, str],
                                     untrusted: Path) -> None:
    """A nested `trustdb run --audit` would need bpf() and a new cgroup: it fails, and the
    untrusted binary is still killed by the outer run's programs (mode is read-only data)."""
    nested = " ".join([*TRUSTDB[:2], repr(TRUSTDB[2])])
    script = (f"{nested} run --audit --db {trusted_db} -- {untrusted}; echo nested=$?; "
              f"{untrusted}; echo rc=$?")
    got = run_confined(trusted_db, script, run_env)
    assert "nested=0" not in got.out, got
    assert "rc=126" in got.out, got  # EPERM from the outer run's first-seen handler


def test_trust_database_unreachable(trusted_db: Path, run_env: dict[str, str],
                                    untrusted: Path, tmp_path: Path) -> None:
    """`trustdb trust` of its own binary, or writing the LMDB files, from inside: both fail,
    and the database on disk is unchanged."""
    digest = hash_file(str(untrusted)).digests.blake3
    with TrustDB.open(trusted_db) as db:
        generation = db.generation
    add = (f"{PY} -c 'import sys; from pathlib import Path; from tests.engine.test_run import "
           "trust_files; trust_files(Path(sys.argv[1]), [sys.argv[2]]); print(\"added\")' ")
    # Unconfined the same code does add entries (to a scratch database).
    scratch = tmp_path / "scratch-db"
    env = dict(run_env, PYTHONPATH=str(Path(__file__).resolve().parents[2]))
    assert run_unconfined(f"{add} {scratch} {untrusted}", env).out == "added\n"
    script = (
        f"ls -A {trusted_db} | wc -l; "
        f"echo junk >> {trusted_db}/data.mdb; echo write=$?; "
        f"{add} {trusted_db} {untrusted}; echo api=$?; "
        f"{' '.join([*TRUSTDB[:2], repr(TRUSTDB[2])])} trust --db {trusted_db} {untrusted}; "
        "echo cli=$?; "
        f"{untrusted}; echo rc=$?"
    )
    # The DB inside the workdir (the worst case: a project holding its own database), where the
    # policy would grant it: it is covered all the same. (Elsewhere it simply does not exist.)
    got = run_confined(trusted_db, script, env, "--workdir", str(trusted_db.parent),
                       "--allow-read", str(tmp_path))
    lines = got.out.split()
    assert lines[0] == "0", got  # the DB directory is covered by an empty tmpfs
    assert "write=0" not in lines and "api=1" in lines and "added" not in lines, got
    assert "cli=0" not in lines, got
    assert "rc=126" in lines, got  # denied (EPERM: the first-seen handler)
    with TrustDB.open(trusted_db) as db:
        assert db.generation == generation
        assert not db.is_trusted(digest)


def test_database_reached_through_another_mount(trusted_db: Path, run_env: dict[str, str],
                                                tmp_path: Path, untrusted: Path) -> None:
    """The DB's filesystem also mounted elsewhere (a bind mount, as containers have): that
    path is covered too. The bind mount lives in a private mount namespace of this test."""
    alias = tmp_path / "alias"
    alias.mkdir()
    inner = (f"ls -A {alias}/db | wc -l; echo junk >> {alias}/db/data.mdb; echo write=$?")
    script = (f"mount --bind {trusted_db.parent} {alias} && ls -A {alias}/db | wc -l && "
              f"{' '.join([*TRUSTDB[:2], repr(TRUSTDB[2])])} run --db {trusted_db} -- "
              f"sh -c '{inner}'")
    p = subprocess.run(["unshare", "-m", "--propagation", "private", "sh", "-c", script],
                       env=run_env, check=False, capture_output=True, text=True, timeout=60)
    lines = p.stdout.split()
    assert lines[0] != "0", p  # outside the run, the alias shows the database
    assert lines[1] == "0", p  # inside, it is covered like the DB path itself
    assert "write=0" not in lines, p


def test_mounts_and_devices(trusted_db: Path, run_env: dict[str, str], tmp_path: Path) -> None:
    """mount/umount are denied (the covers stay), there is no block device to write the disk
    through, and mknod of one is denied."""
    script = (
        f"mount -t tmpfs none {tmp_path}; echo mount=$?; "
        f"umount {trusted_db}; echo umount=$?; "
        "ls /dev | grep -c -E '^(sd|vd|nvme|mem|kmem|port|loop)'; "
        f"mknod {tmp_path}/blk b 254 0; echo mknod=$?; "
        f"mknod {tmp_path}/fifo p; echo fifo=$?"
    )
    got = run_confined(trusted_db, script, run_env)
    lines = got.out.split()
    assert "mount=32" in lines and "umount=32" in lines, got  # mount(8): 32 = failure
    assert "0" in lines, got
    assert "mknod=1" in lines and "fifo=0" in lines, got
    assert not (tmp_path / "blk").exists()


def test_kernel_helper_config_read_only(trusted_db: Path, run_env: dict[str, str]) -> None:
    """core_pattern/modprobe (/proc/sys) and uevent_helper (/sys) would make the kernel run a
    program outside the confined tree: read-only inside."""
    script = ("echo '|/tmp/x' > /proc/sys/kernel/core_pattern; echo core=$?; "
              "cat /proc/sys/kernel/core_pattern >/dev/null; echo read=$?")
    got = run_confined(trusted_db, script, run_env)
    assert "core=1" in got.out.split() or "core=2" in got.out.split(), got
    assert "read=0" in got.out.split()


def test_seccomp_filter_unit() -> None:
    """The filter alone, in a forked child (no BPF): denied calls get EPERM, foreign ABIs are
    never reached, ordinary fork and FIFO creation still work."""
    code = (
        "import ctypes, errno, os\n"
        "from trustdb.confine import seccomp\n"
        "seccomp.install(seccomp.build_filter())\n"
        "l = ctypes.CDLL(None, use_errno=True)\n"
        "def e(nr, *a):\n"
        "    r = l.syscall(nr, *a)\n"
        "    return 'ok' if r >= 0 else errno.errorcode[ctypes.get_errno()]\n"
        "print(e(321, 0, 0, 0), e(101, 16, 1, 0, 0), e(272, 0x02000000), e(308, 0, 0),\n"
        "      e(435, 0, 0), e(165, b'none', b'/mnt', b'tmpfs', 0, 0), e(304, 0, 0, 0),\n"
        "      e(135, 0x0400000), e(135, 0xffffffff), e(56, 0x10000000 | 17, 0, 0, 0, 0))\n"
        "pid = os.fork()\n"
        "if pid == 0: os._exit(5)\n"
        "print(os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1]))\n"
    )
    p = subprocess.run([PY, "-c", code], check=False, capture_output=True, text=True, timeout=30,
                       cwd=Path(__file__).resolve().parents[2])
    assert p.returncode == 0, p.stderr
    assert p.stdout.split() == ["EPERM", "EPERM", "EPERM", "EPERM", "ENOSYS", "EPERM",
                                "EPERM", "EPERM", "ok", "EPERM", "5"]
    assert len(seccomp.build_filter()) < 200


def test_supervisor_killed_while_child_waits_at_gate(tmp_path: Path) -> None:
    """Before the gate opens the child runs nothing: if the supervisor dies there, the child
    sees EOF and exits without exec'ing CMD (no BPF involved)."""
    marker = tmp_path / "ran"
    code = (
        "import os, sys\n"
        "from pathlib import Path\n"
        "from trustdb import confine\n"
        "cg = confine.RunCgroup.create()\n"
        "confine.start_watcher(cg)\n"
        f"child = confine.spawn(['sh', '-c', 'touch {marker}'], cg,"
        f" confine.MountPlan.for_run(Path('{tmp_path}')))\n"
        "print(child.pid, cg.path, flush=True)\n"
        "os._exit(0)\n"
    )
    p = subprocess.run([PY, "-c", code], check=False, capture_output=True, text=True, timeout=30,
                       cwd=Path(__file__).resolve().parents[2])
    assert p.returncode == 0, p.stderr
    pid, cgroup = p.stdout.split()
    deadline = time.monotonic() + 10
    while (Path(f"/proc/{pid}").exists() or Path(cgroup).exists()) and \
            time.monotonic() < deadline:
        time.sleep(0.05)
    assert not Path(f"/proc/{pid}").exists()
    assert not Path(cgroup).exists()
    assert not marker.exists()


@pytest.mark.skipif(shutil.which("bpftool") is None, reason="bpftool not installed")
def test_nothing_pinned_after_run(trusted_db: Path, run_env: dict[str, str]) -> None:
    """Links and maps live in the supervisor's fds only: bpffs gains nothing during a run."""
    before = set(Path("/sys/fs/bpf").rglob("*")) if Path("/sys/fs/bpf").is_dir() else set()
    assert run_confined(trusted_db, "true", run_env).code == 0
    after = set(Path("/sys/fs/bpf").rglob("*")) if Path("/sys/fs/bpf").is_dir() else set()
    assert after == before
