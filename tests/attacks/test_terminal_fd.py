"""A way to the user's terminal when stdin is not a terminal but stdout is (issue 8, route 6),
tracepoint backend: `trustdb run -- agent < prompt.txt`, `echo task | trustdb run -- agent`.

The relayed pty is made only when stdin is a terminal (trustdb.confine.pty.open_if_terminal);
otherwise the tree inherits fds 1 and 2 as they are: open file descriptions of the user's own
terminal, opened read-write. TIOCSTI is denied, but reading works: the tree prints a password
prompt and reads what the user types at their terminal. The test holds a pty master as "the
user's terminal" and types into it; the attack succeeds if the tree reads the keystrokes.
"""

from __future__ import annotations

import os
import pty
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.engine.test_run import TRUSTDB, workdir_of

pytestmark = [pytest.mark.root, pytest.mark.bpf]

STEAL = ("import os, sys; os.write(2, b'[sudo] password: '); "
         "print('STOLE', os.read(1, 100), file=sys.stderr, flush=True)")


def _read_until(fd: int, needle: bytes, timeout: float) -> bytes:
    buf, deadline = b"", time.monotonic() + timeout
    while needle not in buf and time.monotonic() < deadline:
        try:
            buf += os.read(fd, 1000)
        except OSError:
            break
    return buf


def test_keystrokes_read_through_inherited_stdout(interpreters_db: Path,
                                                 run_env: dict[str, str]) -> None:
    master, slave = pty.openpty()
    try:
        proc = subprocess.Popen(
            [*TRUSTDB, "run", "--db", str(interpreters_db), "--", sys.executable, "-c", STEAL],
            env=run_env, cwd=workdir_of(run_env), stdin=subprocess.DEVNULL, stdout=slave,
            stderr=slave)
        os.close(slave)
        slave = -1
        seen = _read_until(master, b"password", 90)
        os.write(master, b"hunter2\n")  # the user types at their own terminal
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        seen += _read_until(master, b"STOLE", 2)
    finally:
        if slave >= 0:
            os.close(slave)
        os.close(master)
    assert b"password" in seen, seen  # the tree ran at all
    assert b"STOLE b'hunter2" not in seen, seen
