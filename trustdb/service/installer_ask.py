"""The first-seen handler's question channel to the daemon: while an installer window is open
(or, with trusted compiler outputs, always), a digest the database does not trust is asked of
the daemon, which first records what trusted writers closed up to now (trustdb.service.installers).
Runs in the handler process (forked by the daemon, so it inherits the socket)."""

from __future__ import annotations

import contextlib
import select
import socket
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

from trustdb.service.closewrite import TRACE
from trustdb.service.installer_windows import any_window_tokens

if TYPE_CHECKING:
    from trustdb.first_seen import OpenTrust, TrustLookup

SEQ = 8
"""Bytes of the question number that each answer repeats."""
ASK_TIMEOUT_S = 15.0
"""How long the first-seen handler waits for the daemon's answer (then: not trusted, and the
channel is closed for good). Generous: the daemon may be hashing the installer's files, and under
emulation (the VM tier) that takes seconds; only execs during an installer window (or, with
trusted compiler outputs, any miss) wait."""


@dataclass(frozen=True, slots=True)
class AskingOpener:
    """The handler's OpenTrust. The handler closes every fd it inherited but `inherited_fds`:
    the question channel must survive that (else every question fails, and the fd number, once
    reused, is another file's)."""

    opener: OpenTrust
    ask: socket.socket
    always_ask: bool

    @property
    def inherited_fds(self) -> tuple[int, ...]:
        return (self.ask.fileno(),)

    def __call__(self) -> TrustLookup:
        return InstallerAwareTrust(self.opener(), self.ask, always_ask=self.always_ask)


class InstallerAwareTrust:
    """The handler's TrustLookup (runs in the handler process)."""

    def __init__(self, db: TrustLookup, ask: socket.socket, *, always_ask: bool = False) -> None:
        self._db = db
        self._ask: socket.socket | None = ask
        self._seq = 0
        self._always_ask = always_ask
        """With trusted compiler outputs: a miss may be what a compiler closed a moment ago."""
        self._asking = False
        self._serve: tuple[int, Callable[[], None]] | None = None
        self._may_ask: Callable[[], bool] = lambda: True

    @property
    def generation(self) -> int:
        return self._db.generation

    def digest_cache(self):  # type: ignore[no-untyped-def]
        return self._db.digest_cache()

    def serve_while_waiting(self, fd: int, serve: Callable[[], None],
                            may_ask: Callable[[], bool]) -> None:
        """While a question is out, call `serve` whenever `fd` (the handler's permission group)
        is readable, and once at the start: the daemon may be blocked in an open that waits for
        the handler, and must be answered before it can answer us. `may_ask` is False while
        the event being decided is the daemon's own (it cannot answer while it waits on us)."""
        self._serve = (fd, serve)
        self._may_ask = may_ask

    def is_trusted(self, digest: bytes) -> bool:
        if self._db.is_trusted(digest):
            return True
        if self._ask is None or self._asking or not self._may_ask():
            return False  # the daemon's own event: it is blocked until we answer it
        if not self._always_ask and not any_window_tokens():  # one readdir
            return False
        self._seq += 1
        seq = self._seq.to_bytes(SEQ, "little")
        self._asking = True
        try:
            self._ask.send(seq + digest)
            answer = self._answer(seq, time.monotonic() + ASK_TIMEOUT_S)
            if TRACE:
                print(f"trustdb: close-write: the handler asked about {digest.hex()[:16]}: {answer}",
                      file=sys.stderr, flush=True)
            return answer
        except OSError as e:
            print(f"trustdb: first-seen handler: the daemon's question channel failed ({e}); "
                  "files installers write are untrusted until the daemon restarts",
                  file=sys.stderr, flush=True)
            self._ask.close()
            self._ask = None
        finally:
            self._asking = False
        return False

    def _serve_daemon(self) -> None:
        """One failed answer must not cost the question channel (is_trusted closes it on
        OSError): the handler counts its own errors."""
        assert self._serve is not None
        with contextlib.suppress(Exception):
            self._serve[1]()

    def _answer(self, seq: bytes, deadline: float) -> bool:
        assert self._ask is not None
        poller = select.poll()
        poller.register(self._ask.fileno(), select.POLLIN)
        if self._serve is not None:
            poller.register(self._serve[0], select.POLLIN)
            self._serve_daemon()  # its events already read with the one being decided
        while (left := deadline - time.monotonic()) > 0:
            ready = {fd for fd, _ in poller.poll(max(1, int(left * 1000)))}
            if self._serve is not None and self._serve[0] in ready:
                self._serve_daemon()
            if self._ask.fileno() in ready:
                try:
                    answer = self._ask.recv(SEQ + 1, socket.MSG_DONTWAIT)
                except BlockingIOError:
                    continue
                if answer[:SEQ] == seq:  # a late answer to an earlier question is dropped
                    return answer[SEQ:] == b"1"
        print(f"trustdb: first-seen handler: the daemon did not answer within {ASK_TIMEOUT_S:.0f} s;"
              " not trusted", file=sys.stderr, flush=True)
        return False  # the daemon is busy: not trusted now


