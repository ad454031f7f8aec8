"""Which decisions a person asked for (`trustdb log --since ... --denied ...`): one frozen
filter over Decision values, whatever they were read from (the JSON-lines file, the journal)."""

from __future__ import annotations

import datetime as dt
import fnmatch
import re
from dataclasses import dataclass

from trustdb.events import Decision

_RELATIVE = re.compile(r"^(\d+(?:\.\d+)?)\s*(s|m|h|d)$")
_UNIT_SECONDS = {"s": 1, "m": 60, "h": 3600, "d": 86400}


def parse_time(text: str, *, now: dt.datetime | None = None) -> dt.datetime:
    """`2026-12-01T20:00:00Z`, `2026-12-01 20:00` (local time), or an age: `90s`, `10m`, `2h`,
    `1d` (that long ago). Raises ValueError with the accepted forms."""
    now = now or dt.datetime.now(dt.UTC)
    m = _RELATIVE.match(text.strip())
    if m:
        return now - dt.timedelta(seconds=float(m.group(1)) * _UNIT_SECONDS[m.group(2)])
    try:
        when = dt.datetime.fromisoformat(text.strip())  # 3.11 accepts a trailing Z
    except ValueError:
        raise ValueError(
            f"not a time: {text!r} (use ISO-8601 such as 2026-12-01T20:00:00Z, or an age such "
            "as 10m, 2h, 1d)"
        ) from None
    return when if when.tzinfo else when.astimezone()


@dataclass(frozen=True, slots=True)
class DecisionFilter:
    """Every field that is set must match (an empty filter matches everything)."""

    since: dt.datetime | None = None
    until: dt.datetime | None = None
    denied: bool = False
    """Only denials (and what audit mode would have denied)."""
    path: str | None = None
    """The file the decision is about: an exact path or a shell pattern (`/tmp/*`)."""
    pid: int | None = None
    """A process (its pid or its thread group id)."""
    exe: str | None = None
    """The program that asked: an exact path or a shell pattern."""
    hook: str | None = None
    """exec, mmap, mprotect or tamper."""

    def matches(self, d: Decision) -> bool:
        if self.since is not None and d.time < self.since:
            return False
        if self.until is not None and d.time > self.until:
            return False
        if self.denied and not d.denied:
            return False
        if self.path is not None and not _match(d.path, self.path):
            return False
        if self.pid is not None and self.pid not in (d.pid, d.tgid):
            return False
        if self.exe is not None and not _match(d.exe, self.exe):
            return False
        return self.hook is None or d.hook.name.lower() == self.hook.lower()


def _match(value: str, pattern: str) -> bool:
    if any(c in pattern for c in "*?["):
        return fnmatch.fnmatchcase(value, pattern)
    return value == pattern
