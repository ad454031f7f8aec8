"""Run by Debian's /usr/bin/python3 (3.11.2) from test_first_seen.py: the CPython gh-104372
trigger. While `trustdb run` is active, a *thread of the supervisor process* spawns
subprocesses whose exec opens a file through the tree's marked mounts, so each exec waits in a
fanotify permission event. With a handler thread in this process, 3.11.2 deadlocks there; with
the forked handler process it cannot. Prints how many were spawned, how many permission events
of unconfined tasks the handler answered meanwhile (each of those execs raised one), and the
run's exit status.

usage: gh104372_probe.py DB N
"""

from __future__ import annotations

import subprocess
import sys
import threading
import time
from pathlib import Path

from trustdb import session, supervisor

db, n = Path(sys.argv[1]), int(sys.argv[2])
sessions: list[session.EngineSession] = []
spawned = 0
answered = 0


def factory(config, dbp, backend, consume):  # type: ignore[no-untyped-def]
    s = session.EngineSession(config, dbp, backend, consume)
    sessions.append(s)
    return s


def spawn_through_the_tree() -> None:
    global spawned, answered
    while not (sessions and sessions[0]._engine.first_seen):
        time.sleep(0.02)
    pid = supervisor_child_pid()
    for _ in range(n):
        subprocess.run([f"/proc/{pid}/root/bin/true"], check=True, timeout=20)
        spawned += 1
    handler = sessions[0]._engine.first_seen
    deadline = time.monotonic() + 10  # the handler counts after it answers: let it catch up
    while handler.stats()["unconfined"] < n and time.monotonic() < deadline:
        time.sleep(0.05)
    answered = handler.stats()["unconfined"]


def supervisor_child_pid() -> int:
    for line in Path(f"/proc/{sessions[0]._engine.first_seen.pid}/status").read_text().split("\n"):
        if line.startswith("PPid:"):
            ppid = int(line.split()[1])
    children = Path(f"/proc/{ppid}/task/{ppid}/children").read_text().split()
    handler = sessions[0]._engine.first_seen.pid
    return next(int(c) for c in children
                if int(c) != handler and Path(f"/proc/{c}/ns/mnt").stat().st_ino
                != Path("/proc/self/ns/mnt").stat().st_ino)


t = threading.Thread(target=spawn_through_the_tree, daemon=True)
t.start()
rc = supervisor.run(supervisor.RunOptions(argv=["/bin/sh", "-c", "sleep 4"], db=db),
                    engine_factory=factory)
t.join(timeout=30)
print(f"spawned {spawned} answered {answered} rc {rc}", flush=True)
