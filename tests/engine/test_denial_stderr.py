"""Denials an agent can read (issue 10 part 4): the line reaches the tool's *own* stderr.

A real `trustdb run` on the tracepoint backend. Inside the tree an agent-like parent
(tests/engine/agent_tools.py) runs each tool with its own stderr pipe and reads it to EOF, as
an agent does. The tracepoint backend cannot fail an mmap: a tool that maps an untrusted library
(ctypes.CDLL, LD_PRELOAD) or runs untrusted code through ld.so is killed at once, so the line
must come from the stderr copy the first-seen handler took at the library's open
(trustdb.held_stderr). An untrusted exec is refused (EPERM) while the task waits.

Then the tree points the tool's fd 2 at hostile places (a full pipe, socket or FIFO nobody
reads, a stopped terminal, a file opened read-only, a /proc file): nothing is written there,
and the handler never stalls (the run's later opens are still answered). Everything denied is
inside the cgroup the run creates.
"""

from __future__ import annotations

import ctypes.util
import json
import os
import stat
import subprocess
import sys
from pathlib import Path

import pytest

from tests.engine.agent_tools import AGENT
from tests.engine.test_run import TRUSTDB, trusted_db  # noqa: F401 - a fixture
from trustdb.denial_stderr import target_kind

pytestmark = [pytest.mark.root, pytest.mark.bpf]

LDSO = os.path.realpath("/lib64/ld-linux-x86-64.so.2")
PY = [sys.executable, "-I", "-S"]


@pytest.fixture
def db(trusted_db: Path) -> Path:  # noqa: F811 - test_run's session database
    return trusted_db


@pytest.fixture
def work(tmp_path: Path) -> Path:
    libm = os.path.realpath(f"/lib/x86_64-linux-gnu/{ctypes.util.find_library('m')}")
    (tmp_path / "libevil.so").write_bytes(Path(libm).read_bytes() + b"\0untrusted")
    evil = tmp_path / "evilbin"
    evil.write_bytes(Path("/bin/true").read_bytes() + b"\0untrusted")
    evil.chmod(0o755)
    return tmp_path


def agent(db: Path, work: Path, cases: list[list[object]]) -> dict[str, dict[str, object]]:
    (work / "log").mkdir(exist_ok=True)
    env = dict(os.environ, TRUSTDB_LOG=str(work / "log" / "decisions.jsonl"),
               TRUSTDB_RUN_DIR=str(work / "state"))
    p = subprocess.run([*TRUSTDB, "run", "--db", str(db), "--", *PY, "-c", AGENT,
                        json.dumps(cases)], env=env, capture_output=True, text=True, check=False,
                       cwd=work, timeout=240)
    assert p.returncode == 0, (p.stdout, p.stderr[-3000:])
    return dict(json.loads(p.stdout.splitlines()[-1]))


def cdll(work: Path) -> list[str]:
    return [*PY, "-c", f"import ctypes; ctypes.CDLL('{work}/libevil.so')"]


def test_killed_tools_own_stderr_pipe_carries_the_line(db: Path, work: Path) -> None:
    """dlopen (ctypes.CDLL), LD_PRELOAD and `ld.so ./evil` are SIGKILLed; an untrusted exec
    gets EPERM: in each the tool's own stderr pipe carries the line, file and digest."""
    got = agent(db, work, [
        ["cdll", cdll(work), {}, "pipe"],
        ["preload", ["/bin/true"], {"LD_PRELOAD": f"{work}/libevil.so"}, "pipe"],
        ["ldso", [LDSO, f"{work}/evilbin"], {}, "pipe"],
        ["exec", ["bash", "-c", f"{work}/evilbin"], {}, "pipe"],
        ["file", cdll(work), {}, "file"],
    ])
    for name, path, verb in (("cdll", "libevil.so", "executable mapping"),
                             ("preload", "libevil.so", "executable mapping"),
                             ("ldso", "evilbin", "executable mapping"),
                             ("exec", "evilbin", "exec"), ("file", "libevil.so",
                                                            "executable mapping")):
        r = got[name]
        assert r["rc"] == (126 if name == "exec" else -9), (name, r)
        text = str(r["stderr"])
        assert f"trustdb: denied {verb} of {work}/{path}" in text, (name, text)
        assert "content blake3 " in text and f"trustdb trust --db {db} {work}/{path}" in text


def test_hostile_stderr_gets_nothing_and_never_stalls_the_handler(db: Path, work: Path) -> None:
    """The tree chooses what fd 2 is. Full pipes, sockets and FIFOs, a stopped terminal, a
    read-only file and a /proc file get no line and cannot block the handler: the normal case
    after them (a first-seen open answered by the same handler) still gets its line."""
    hostile = ("fullpipe", "fullsocket", "fullfifo", "stoppedpty", "rdonly", "proc")
    got = agent(db, work, [*([k, cdll(work), {}, k] for k in hostile),
                           ["after", cdll(work), {}, "pipe"]])
    for kind in hostile:  # run's /proc is read-only: a /proc file cannot even be opened
        assert got[kind]["rc"] == (None if kind == "proc" else -9), (kind, got[kind])
    assert (work / "rdonly.ro").read_text() == ""
    assert "trustdb: denied executable mapping of" in str(got["after"]["stderr"]), got


def test_only_safe_kinds_of_stderr_are_written(tmp_path: Path) -> None:
    """target_kind: pipes and sockets are written without blocking; terminals, FIFOs and
    local files through a writer thread; never /proc, /dev/null, netlink, a read-only
    description, or a file whose content is trusted."""
    import socket

    r, w = os.pipe()
    a, b = socket.socketpair()
    nl = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, 0)
    f = tmp_path / "f"
    f.write_text("")
    fds = {
        "pipe": w, "socket": a.fileno(), "netlink": nl.fileno(),
        "file": os.open(f, os.O_WRONLY), "rdonly": os.open(f, os.O_RDONLY),
        "proc": os.open("/proc/self/comm", os.O_WRONLY),
        "null": os.open("/dev/null", os.O_WRONLY),
    }
    try:
        kinds = {name: target_kind(fd) for name, fd in fds.items()}
        trusted = target_kind(fds["file"], lambda st: stat.S_ISREG(st.st_mode))
    finally:
        for name in ("file", "rdonly", "proc", "null"):
            os.close(fds[name])
        for s in (a, b, nl):
            s.close()
        os.close(r)
        os.close(w)
    assert kinds == {"pipe": "pipe", "socket": "socket", "netlink": None, "file": "thread",
                     "rdonly": None, "proc": None, "null": None}
    assert trusted is None
