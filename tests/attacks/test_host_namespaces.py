"""What the confined root still shares with the host, tracepoint backend: the UTS and network
namespaces, with CAP_SYS_ADMIN, CAP_NET_RAW and CAP_SYSLOG kept (only CAP_SYS_TIME is dropped).

- sethostname(2) changes the *host's* name (here: set to the name it already has);
- a packet socket sees and sends every frame of the host: Landlock's TCP port rules (connect
  only to 443 and 53) do not apply to AF_PACKET or raw IP sockets, and it sniffs other
  processes' traffic;
- syslog(2) reads (and could clear) the kernel log.
Each probe is harmless to the host; success means the tree could do the harmful version.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

from tests.attacks.conftest import inline_code
from tests.engine.test_run import run_confined

pytestmark = [pytest.mark.root, pytest.mark.bpf]

PROBES = {
    "sethostname": ("import ctypes, socket; l = ctypes.CDLL(None); n = socket.gethostname()"
                    ".encode(); print('OK' if l.sethostname(n, len(n)) == 0 else 'refused')"),
    "packet_socket": ("import socket\ntry:\n socket.socket(socket.AF_PACKET, socket.SOCK_RAW,"
                      " socket.htons(3)); print('OK')\nexcept OSError: print('refused')"),
    "raw_tcp_socket": ("import socket\ntry:\n socket.socket(socket.AF_INET, socket.SOCK_RAW, "
                       "socket.IPPROTO_TCP); print('OK')\nexcept OSError: print('refused')"),
    "kernel_log": ("import ctypes; l = ctypes.CDLL(None); b = ctypes.create_string_buffer(16384);"
                   " print('OK' if l.klogctl(3, b, 16384) > 0 else 'refused')"),
}


@pytest.mark.parametrize("probe", sorted(PROBES))
def test_host_facility(interpreters_db: Path, run_env: dict[str, str], probe: str) -> None:
    (Path(run_env["TRUSTDB_LOG"]).parents[1] / "probe.txt").write_text(PROBES[probe] + "\n")
    got = run_confined(interpreters_db, f"{sys.executable} {inline_code('probe.txt')}", run_env)
    assert "OK" in got.out or "refused" in got.out, (got.out, got.err)
    assert "OK" not in got.out, got.out
