"""systemd notifications through a real AF_UNIX datagram socket, as systemd listens."""

from __future__ import annotations

import socket
from pathlib import Path

import pytest

from trustdb.service.notify import Notifier


def test_ready_status_and_watchdog(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = str(tmp_path / "notify")
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(path)
    sock.settimeout(5)
    monkeypatch.setenv("NOTIFY_SOCKET", path)
    monkeypatch.setenv("WATCHDOG_USEC", "2000000")
    monkeypatch.delenv("WATCHDOG_PID", raising=False)
    n = Notifier()
    assert n.watchdog_interval_s == 1.0
    n.ready("enforcing")
    msg = sock.recv(4096).decode()
    assert "READY=1" in msg and "STATUS=enforcing" in msg
    n.watchdog()
    assert sock.recv(4096) == b"WATCHDOG=1"
    n.watchdog()  # too soon: no second ping
    sock.settimeout(0.2)
    with pytest.raises(TimeoutError):
        sock.recv(4096)
    sock.close()


def test_without_systemd_is_a_no_op(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("NOTIFY_SOCKET", raising=False)
    monkeypatch.delenv("WATCHDOG_USEC", raising=False)
    n = Notifier()
    assert n.watchdog_interval_s is None
    n.ready("x")
    n.watchdog()
