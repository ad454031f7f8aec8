"""`trustdb daemon`: system-wide enforcement, the process the service unit runs."""

from __future__ import annotations

import os
import select
import signal
import sys
from pathlib import Path
from types import FrameType
from typing import TextIO

from trustdb.abi import Mode
from trustdb.backends.interface import BackendError, EngineConfig, Scope
from trustdb.session import (
    REFRESH_INTERVAL_S,
    DenialReporter,
    EngineFactory,
    SupervisorError,
    daemon_engine,
)
from trustdb.state import EngineState, publish_state, withdraw_state


def daemon(*, db: Path, mode: Mode, backend: str | None,
           engine_factory: EngineFactory = daemon_engine, stderr: TextIO | None = None) -> int:
    """System-wide enforcement until SIGTERM/SIGINT (the service: only a user starts it)."""
    if os.geteuid() != 0:
        raise SupervisorError("trustdb daemon needs root (it loads BPF programs)")
    out = stderr or sys.stderr
    stop: list[int] = []

    def _stop(sig: int, frame: FrameType | None) -> None:
        stop.append(sig)

    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, _stop)
    reporter = DenialReporter(db=db.resolve(), out=out)
    config = EngineConfig(mode=mode, scope=Scope(), supervisor_tgid=os.getpid())
    try:
        engine = engine_factory(config, db.resolve(), backend, reporter)
    except BackendError as e:
        raise SupervisorError(str(e)) from e
    publish_state(EngineState(os.getpid(), "daemon", engine.backend_name, mode.name.lower(),
                              "system-wide"))
    print(f"trustdb: enforcing system-wide ({mode.name.lower()}) with the "
          f"{engine.backend_name} backend", file=out, flush=True)
    try:
        poller = select.poll()
        poller.register(engine.fileno(), select.POLLIN)
        while not stop:
            poller.poll(int(REFRESH_INTERVAL_S * 1000))
            engine.pump()
    finally:
        engine.close()
        withdraw_state(os.getpid())
    return 0
