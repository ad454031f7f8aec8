"""DNS for a tree that may not use UDP: a relay from TCP port 53 on a loopback address to the
host's own name servers.

Landlock rules cover TCP alone, so `trustdb run` refuses every other IP socket (seccomp), UDP
included, and with it ordinary DNS. Many resolvers do not answer over TCP (`options use-vc`
alone would leave the tree without names), so the supervisor, outside the tree, listens on
127.X.Y.Z:53 (TCP, a loopback address of its own) and forwards each query over UDP to the
servers of the host's /etc/resolv.conf. The tree's /etc/resolv.conf names only the relay, with
`options use-vc`. Only DNS messages pass: one length-prefixed query in, one answer out.
"""

from __future__ import annotations

import contextlib
import errno
import os
import random
import socket
import struct
import threading
from collections.abc import Iterator, Sequence
from pathlib import Path

PORT = 53
UPSTREAM_TIMEOUT_S = 3.0
MAX_MESSAGE = 65535
CLIENT_TIMEOUT_S = 10.0
MAX_CLIENTS = 32


def host_nameservers(resolv_conf: str = "/etc/resolv.conf") -> list[str]:
    try:
        lines = Path(resolv_conf).read_text().splitlines()
    except OSError:
        return []
    return [f[1] for f in (ln.split() for ln in lines) if len(f) >= 2 and f[0] == "nameserver"]


BIND_TRIES = 64


def _loopback_addresses() -> Iterator[str]:
    """127.53.X.Y (no clash with resolvers on 127.0.0.1 / 127.0.0.53): first from our pid, then
    at random (pid_max reaches 4M, so two runs' pids can share their low 16 bits)."""
    pid = os.getpid()
    yield f"127.53.{(pid >> 8) & 0xFF}.{min(max(pid & 0xFF, 1), 254)}"  # never .0 or .255
    rng = random.SystemRandom()
    for _ in range(BIND_TRIES - 1):
        yield f"127.53.{rng.randrange(256)}.{rng.randrange(1, 255)}"


class DnsRelay:
    """A TCP listener whose queries go to `upstream` over UDP. `start()` then `close()`."""

    def __init__(self, upstream: Sequence[str]) -> None:
        self.upstream = [u for u in upstream if u]
        self.address = ""
        self._listener: socket.socket | None = None
        self._stop = threading.Event()
        self._slots = threading.BoundedSemaphore(MAX_CLIENTS)
        self._files: list[Path] = []

    def listen(self) -> str:
        """Bind and listen (before the tree is forked); returns the address."""
        s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        s.set_inheritable(False)
        for address in _loopback_addresses():
            try:
                s.bind((address, PORT))
            except OSError as e:
                if e.errno != errno.EADDRINUSE:
                    s.close()
                    raise
                continue  # another run's relay (or anything) holds it: another address
            self.address = address
            break
        else:
            s.close()
            raise OSError(errno.EADDRINUSE, f"no free 127.53.x.y:{PORT} in {BIND_TRIES} tries")
        s.listen(16)
        s.settimeout(0.5)
        self._listener = s
        return self.address

    def serve(self) -> None:
        """Answer in a thread of its own (after the fork: `confine.spawn` wants no threads)."""
        threading.Thread(target=self._accept, name="dns-relay", daemon=True).start()

    def write_resolv_conf(self, directory: Path = Path("/run/trustdb")) -> Path:
        """The tree's /etc/resolv.conf, in a directory the tree does not reach."""
        directory.mkdir(mode=0o755, parents=True, exist_ok=True)
        path = directory / f"resolv-{os.getpid()}.conf"
        path.write_text(self.resolv_conf())
        self._files.append(path)
        return path

    def resolv_conf(self) -> str:
        return (f"# trustdb run: DNS over TCP through the supervisor (UDP is refused inside)\n"
                f"nameserver {self.address}\noptions use-vc\n")

    def close(self) -> None:
        self._stop.set()
        for path in self._files:
            with contextlib.suppress(OSError):
                path.unlink()
        if self._listener is not None:
            self._listener.close()
            self._listener = None

    def _accept(self) -> None:
        while not self._stop.is_set():
            listener = self._listener
            if listener is None:
                return
            try:
                conn, _ = listener.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            if not self._slots.acquire(blocking=False):
                conn.close()
                continue
            threading.Thread(target=self._serve, args=(conn,), daemon=True).start()

    def _serve(self, conn: socket.socket) -> None:
        try:
            with conn:
                conn.settimeout(CLIENT_TIMEOUT_S)
                while (query := _read_message(conn)) is not None:
                    answer = self._ask(query)
                    if answer is None:
                        return
                    conn.sendall(struct.pack("!H", len(answer)) + answer)
        except OSError:
            return
        finally:
            self._slots.release()

    def _ask(self, query: bytes) -> bytes | None:
        for server in self.upstream:
            family = socket.AF_INET6 if ":" in server else socket.AF_INET
            with contextlib.closing(socket.socket(family, socket.SOCK_DGRAM)) as u:
                u.settimeout(UPSTREAM_TIMEOUT_S)
                try:
                    u.connect((server, PORT))
                    u.send(query)
                    answer = u.recv(MAX_MESSAGE)
                except OSError:
                    continue
                if answer[:2] == query[:2]:  # the same message id
                    return answer
        return None


def _read_message(conn: socket.socket) -> bytes | None:
    head = _read_exactly(conn, 2)
    if head is None:
        return None
    (size,) = struct.unpack("!H", head)
    return _read_exactly(conn, size) if size >= 12 else None


def _read_exactly(conn: socket.socket, n: int) -> bytes | None:
    data = b""
    while len(data) < n:
        chunk = conn.recv(n - len(data))
        if not chunk:
            return None
        data += chunk
    return data
