"""Cleanups that all run: the engines' shutdown (session.EngineSession, service.ServiceEngine)."""

from __future__ import annotations

import sys
from collections.abc import Callable


class Closers:
    """Callables run last-added first on `close()`; one that raises is reported on stderr and
    the next still runs (an fd left open would hold a BPF link or a fanotify group)."""

    def __init__(self) -> None:
        self._stack: list[Callable[[], None]] = []

    def append(self, closer: Callable[[], None]) -> None:
        self._stack.append(closer)

    def close(self) -> None:
        while self._stack:
            closer = self._stack.pop()
            try:
                closer()
            except Exception as e:  # noqa: BLE001 - the next closer must still run
                print(f"trustdb: cleanup: {e}", file=sys.stderr)
