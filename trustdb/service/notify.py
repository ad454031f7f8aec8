"""systemd's notification protocol for the service (Type=notify, WatchdogSec=), via cysystemd.

READY=1 is sent once the programs are attached (or adopted) and the map is filled: units ordered
after trustdb.service start only when what they exec is judged. WATCHDOG=1 comes from the main
loop, so a daemon stuck anywhere stops pinging and systemd restarts it (the pins keep the
kernel deciding meanwhile). Without $NOTIFY_SOCKET (not started by systemd) every call is a no-op.
"""

from __future__ import annotations

import os
import sys
import time

# Loaded at import, not at the first notification: the daemon runs its preflight (every file it
# maps must be trusted) before it enforces, and a C extension mapped later would be denied.
from cysystemd._daemon import sd_notify


class Notifier:
    def __init__(self) -> None:
        self._enabled = bool(os.environ.get("NOTIFY_SOCKET"))
        usec = os.environ.get("WATCHDOG_USEC", "")
        pid = os.environ.get("WATCHDOG_PID", "")
        ours = not pid or pid == str(os.getpid())
        self.watchdog_interval_s: float | None = (
            int(usec) / 2e6 if usec.isdigit() and int(usec) > 0 and ours else None
        )
        """Half the unit's WatchdogSec (systemd's advice), or None without a watchdog."""
        self._next_ping = 0.0

    def _send(self, line: str) -> None:
        if not self._enabled:
            return
        try:
            sd_notify(line, False)
        except (RuntimeError, ValueError) as e:  # systemd went away: nothing to tell
            print(f"trustdb: sd_notify: {e}", file=sys.stderr, flush=True)

    def ready(self, status: str) -> None:
        self._send(f"READY=1\nSTATUS={status}\nMAINPID={os.getpid()}")

    def reloading(self) -> None:
        self._send("RELOADING=1\nSTATUS=reloading the trust database")

    def status(self, text: str) -> None:
        self._send(f"STATUS={text}")

    def stopping(self) -> None:
        self._send("STOPPING=1")

    def watchdog(self) -> None:
        """Ping if half the watchdog interval has passed since the last ping."""
        if self.watchdog_interval_s is None:
            return
        now = time.monotonic()
        if now >= self._next_ping:
            self._next_ping = now + self.watchdog_interval_s
            self._send("WATCHDOG=1")
