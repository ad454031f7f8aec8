"""A way out of the tree through a pathname UNIX socket, tracepoint backend (Landlock ABI 7).

Landlock hides every path the policy does not grant, but connect(2) to a pathname UNIX socket
is not a Landlock filesystem access on this kernel (no right covers it). So the mount plan
covers everything the policy lists nothing of (`MountPlan.unlisted`: /var/lib, /srv, a home's
other entries), as well as /run and /var/run: no path there resolves at all. Any root service that listens on a
socket (docker, containerd, systemd's private socket and D-Bus, PostgreSQL's `COPY ... TO
PROGRAM`, a CI runner's agent) then runs what the tree asks for, outside its cgroup, unjudged.

The stand-in here is a listener in a directory the tree cannot even list; it answers with its
own cgroup (what a real daemon's job would run in). The attack succeeds if the reply arrives.
"""

from __future__ import annotations

import os
import shutil
import socket
import sys
import threading
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.engine.test_run import run_confined

pytestmark = [pytest.mark.root, pytest.mark.bpf]

REPLY = b"OUTSIDE-SERVICE-ANSWERED"


@pytest.fixture
def outside_service() -> Iterator[Path]:
    """A listening socket under /run (not granted by the agent policy), removed afterwards."""
    yield from _service(Path("/run"))


@pytest.fixture
def var_lib_service() -> Iterator[Path]:
    """The same under /var/lib, where daemons also keep sockets (LXD's
    /var/snap/lxd/common/lxd/unix.socket, MySQL, libvirt, containerd's state dirs)."""
    yield from _service(Path("/var/lib"))


def _service(parent: Path) -> Iterator[Path]:
    top = parent / f"trustdb-attack-{uuid.uuid4().hex[:8]}"
    top.mkdir(mode=0o700)
    path = top / "daemon.sock"
    server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    server.bind(str(path))
    server.listen(4)
    server.settimeout(0.2)
    stop = threading.Event()

    def serve() -> None:
        while not stop.is_set():
            try:
                conn, _ = server.accept()
            except OSError:
                continue
            with conn:
                conn.recv(100)
                conn.sendall(REPLY + b" " + Path("/proc/self/cgroup").read_bytes()[-60:])

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    try:
        yield path
    finally:
        stop.set()
        thread.join(5)
        server.close()
        shutil.rmtree(top, ignore_errors=True)


def _client(path: Path) -> str:
    return (f"{sys.executable} -c 'import socket; s=socket.socket(socket.AF_UNIX); "
            f"s.connect(\"{path}\"); s.sendall(b\"run this\"); print(s.recv(200).decode())'")


def test_directory_itself_is_hidden(interpreters_db: Path, run_env: dict[str, str],
                                    outside_service: Path) -> None:
    """Control: the socket's directory is out of the tree's reach as a directory."""
    got = run_confined(interpreters_db, f"ls {outside_service.parent}; echo rc=$?", run_env)
    assert "rc=2" in got.out and "daemon.sock" not in got.out, (got.out, got.err)


def test_connect_to_a_service_outside(interpreters_db: Path, run_env: dict[str, str],
                                      outside_service: Path) -> None:
    assert os.path.exists(outside_service)
    got = run_confined(interpreters_db, _client(outside_service), run_env)
    assert REPLY.decode() not in got.out, got.out


def test_connect_to_a_service_under_var_lib(interpreters_db: Path, run_env: dict[str, str],
                                            var_lib_service: Path) -> None:
    got = run_confined(interpreters_db, _client(var_lib_service), run_env)
    assert REPLY.decode() not in got.out, got.out
