"""The network of `trustdb run` beyond Landlock's TCP rules, tracepoint backend (Landlock ABI 7).

Landlock's port rules see TCP alone. The agent policy allows TCP connect to 443 and 53 and
nothing else, so every other IP socket must be refused too, or UDP (and ICMP, SCTP) would be
a way out to anything listening: seccomp refuses socket(2) for AF_INET/AF_INET6 unless it is
TCP (or UDP where the policy says `udp = true`). Names still resolve: the tree's resolv.conf
names the supervisor's DNS relay (TCP 53 on a loopback address, trustdb.dns_relay), which
asks the host's servers over UDP from outside.
"""

from __future__ import annotations

import json
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.engine.test_run import TRUSTDB, run_confined, workdir_of

pytestmark = [pytest.mark.root, pytest.mark.bpf]

PROBE = """
import socket, sys
kinds = {{
    "udp4": (socket.AF_INET, socket.SOCK_DGRAM, 0),
    "udp6": (socket.AF_INET6, socket.SOCK_DGRAM, 0),
    "udp_nonblock": (socket.AF_INET, socket.SOCK_DGRAM | socket.SOCK_NONBLOCK, 0),
    "ping": (socket.AF_INET, socket.SOCK_DGRAM, socket.IPPROTO_ICMP),
    "sctp": (socket.AF_INET, socket.SOCK_STREAM, 132),
    "seqpacket": (socket.AF_INET, socket.SOCK_SEQPACKET, 0),
    "mptcp": (socket.AF_INET, socket.SOCK_STREAM, 262),
}}
for name, (family, kind, proto) in kinds.items():
    try:
        s = socket.socket(family, kind, proto)
    except OSError as e:
        print(name, "refused", e.errno)
        continue
    try:
        s.sendto(b"out", ("127.0.0.1", {port}))
    except OSError:
        pass
    print(name, "OPEN")
tcp = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
print("tcp", "ok")
unix = socket.socketpair()
print("unix", "ok")
"""


@pytest.fixture
def udp_listener() -> Iterator[tuple[int, list[bytes]]]:
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    s.bind(("127.0.0.1", 0))
    s.settimeout(0.2)
    got: list[bytes] = []
    stop = threading.Event()

    def serve() -> None:
        while not stop.is_set():
            try:
                got.append(s.recv(100))
            except OSError:
                continue

    t = threading.Thread(target=serve, daemon=True)
    t.start()
    try:
        yield s.getsockname()[1], got
    finally:
        stop.set()
        t.join(2)
        s.close()


def test_udp_and_other_ip_sockets_are_refused(interpreters_db: Path, run_env: dict[str, str],
                                              udp_listener: tuple[int, list[bytes]]) -> None:
    port, received = udp_listener
    (workdir_of(run_env) / "probe.txt").write_text(PROBE.format(port=port))
    got = run_confined(interpreters_db, f"{sys.executable} -c \"exec(open('probe.txt').read())\"",
                       run_env)
    assert "tcp ok" in got.out and "unix ok" in got.out, (got.out, got.err)
    assert "OPEN" not in got.out, got.out
    for name in ("udp4", "udp6", "udp_nonblock", "ping", "sctp", "seqpacket", "mptcp"):
        assert f"{name} refused 13" in got.out, (name, got.out)
    time.sleep(0.3)
    assert received == [], received
    assert "UDP and other non-TCP IP sockets refused (seccomp)" in got.err, got.err


def test_udp_allowed_by_policy(interpreters_db: Path, run_env: dict[str, str],
                               udp_listener: tuple[int, list[bytes]], tmp_path: Path) -> None:
    """Control: `udp = true` lets UDP through (and still refuses SCTP and the rest)."""
    port, received = udp_listener
    policy = tmp_path / "udp.toml"
    agent = (Path(__file__).parents[2] / "policies" / "agent.toml").read_text()
    policy.write_text(agent.replace("bind_tcp = []", "bind_tcp = []\nudp = true"))
    (workdir_of(run_env) / "probe.txt").write_text(PROBE.format(port=port))
    got = run_confined(interpreters_db, f"{sys.executable} -c \"exec(open('probe.txt').read())\"",
                       run_env, "--policy", str(policy))
    assert "udp4 OPEN" in got.out and "sctp refused 13" in got.out, (got.out, got.err)
    for _ in range(20):
        if received:
            break
        time.sleep(0.1)
    assert b"out" in received


def test_names_resolve_over_the_relay(interpreters_db: Path, run_env: dict[str, str]) -> None:
    """DNS works inside although UDP does not: through the supervisor's TCP relay."""
    try:
        socket.getaddrinfo("deb.debian.org", 443)
    except OSError:
        pytest.skip("this host cannot resolve names itself")
    lookup = ("import socket; print('resolved', socket.getaddrinfo('deb.debian.org', 443, "
              "type=socket.SOCK_STREAM)[0][4][0])")
    got = run_confined(interpreters_db, f"cat /etc/resolv.conf; {sys.executable} -c \"{lookup}\"",
                       run_env)
    assert "options use-vc" in got.out and "nameserver 127.53." in got.out, (got.out, got.err)
    assert "resolved" in got.out, (got.out, got.err)


def test_status_names_the_confinement(interpreters_db: Path, run_env: dict[str, str]) -> None:
    """`trustdb status` says what confines each run, as the run's first line does."""
    p = subprocess.Popen([*TRUSTDB, "run", "--db", str(interpreters_db), "--", "sleep", "20"],
                         env=run_env, cwd=workdir_of(run_env), stdout=subprocess.PIPE,
                         stderr=subprocess.PIPE, text=True)
    try:
        engines: list[dict[str, object]] = []
        for _ in range(100):
            out = subprocess.run([*TRUSTDB, "status", "--db", str(interpreters_db), "--json"],
                                 env=run_env, capture_output=True, text=True, check=False).stdout
            if out.strip():
                engines = [e for e in json.loads(out).get("engines", []) if e["kind"] == "run"]
            if engines:
                break
            time.sleep(0.2)
        assert engines, "the run never showed in trustdb status"
        confinement = str(engines[0]["confinement"])
        assert "Landlock ABI" in confinement or "mount namespace" in confinement, confinement
        assert "seccomp" in confinement, confinement
    finally:
        p.terminate()
        p.communicate(timeout=30)
