"""The DNS relay's listening address (trustdb.dns_relay): two runs whose pids share their low
16 bits (pid_max reaches 4M) must not collide; the second picks another free address."""

from __future__ import annotations

import os

import pytest

from trustdb import dns_relay
from trustdb.dns_relay import DnsRelay

pytestmark = pytest.mark.root


def test_second_relay_with_the_same_pid_bits_binds_elsewhere() -> None:
    if os.geteuid() != 0:
        pytest.fail("binding port 53 needs root (CI runs as root)")
    first, second = DnsRelay(["127.0.0.1"]), DnsRelay(["127.0.0.1"])
    try:
        a = first.listen()
        b = second.listen()  # the same pid: the same first candidate, already taken
        assert a.startswith("127.53.") and b.startswith("127.53.") and a != b
        assert f"nameserver {b}" in second.resolv_conf()
    finally:
        first.close()
        second.close()


def test_candidates_start_from_the_pid() -> None:
    got = list(dns_relay._loopback_addresses())
    assert len(got) == dns_relay.BIND_TRIES
    assert all(a.startswith("127.53.") and not a.endswith((".0", ".255")) for a in got)
