"""Serializers: Decision -> bytes (JSON lines, text, the journal's native protocol)."""

from __future__ import annotations

import datetime as dt
import json
import struct
from collections.abc import Callable
from typing import Any, Protocol

from trustdb.abi import Verdict
from trustdb.events.decision import Decision, _dev_str, _enum_name


class Serializer(Protocol):
    def serialize(self, decision: Decision) -> bytes:
        """One record, newline-terminated."""
        ...


class JsonLinesSerializer:
    """One compact JSON object per line (ASCII: non-UTF-8 path bytes survive as escapes)."""

    def serialize(self, decision: Decision) -> bytes:
        return json.dumps(decision.to_dict(), separators=(",", ":")).encode() + b"\n"


class TextSerializer:
    """One line a person reads: `TIME VERDICT HOOK PATH by COMM[PID] uid=... (reason) ...`."""

    def serialize(self, decision: Decision) -> bytes:
        return render_text(decision).encode("utf-8", "backslashreplace") + b"\n"


_VERDICT_WORD = {Verdict.ALLOW: "ALLOW", Verdict.DENY: "DENY", Verdict.AUDIT_DENY: "WOULD-DENY"}


def render_text(d: Decision) -> str:
    when = d.time.astimezone(dt.UTC).strftime("%Y-%m-%d %H:%M:%S.%f")[:-3] + "Z"
    what = d.path or "-"
    exe = f" exe={d.exe}" if d.exe and d.exe != d.path else ""
    return (
        f"{when} {_VERDICT_WORD[d.verdict]} {_enum_name(d.hook)} {what}"
        f" by {d.comm}[{d.tgid}]{exe} uid={d.uid} ppid={d.ppid} ({d.reason})"
        f" dev={_dev_str(d.dev)} ino={d.ino} {_enum_name(d.mode)}/{d.backend}"
        + (f" rule=[{d.mode_rule}]" if d.mode_rule else "")
    )



# --- the journal: structured fields, one MESSAGE_ID per kind of decision -----------------------

MESSAGE_IDS: dict[str, str] = {
    "exec-denied": "7f0d2c5e9a8b4b6f8e1d3a2c4b6e8f01",
    "mmap-denied": "7f0d2c5e9a8b4b6f8e1d3a2c4b6e8f02",
    "mprotect-denied": "7f0d2c5e9a8b4b6f8e1d3a2c4b6e8f03",
    "would-deny": "7f0d2c5e9a8b4b6f8e1d3a2c4b6e8f04",
    "tamper": "7f0d2c5e9a8b4b6f8e1d3a2c4b6e8f05",
    "allowed": "7f0d2c5e9a8b4b6f8e1d3a2c4b6e8f06",
}
"""`journalctl MESSAGE_ID=7f0d...01` finds every denied exec; the ids never change."""

JOURNAL_PREFIX = "TRUSTDB_"
_PRIORITY = {Verdict.DENY: 4, Verdict.AUDIT_DENY: 5, Verdict.ALLOW: 6}  # warning, notice, info


def decision_kind(d: Decision) -> str:
    if d.verdict == Verdict.ALLOW:
        return "allowed"
    if d.hook.name == "TAMPER":
        return "tamper"
    if d.verdict == Verdict.AUDIT_DENY:
        return "would-deny"
    return f"{d.hook.name.lower()}-denied"


class JournalSerializer:
    """The journal's native protocol (KEY=VALUE lines; a value with a newline in the binary
    form): MESSAGE is the text line, TRUSTDB_* carry every field of the decision, TRUSTDB_DIGEST
    the BLAKE3 of the denied file as it is now (empty if unreadable), MESSAGE_ID its kind."""

    def __init__(self, digest_of: Callable[[str], str] | None = None) -> None:
        self._digest_of = digest_of or _current_digest

    def fields(self, d: Decision) -> dict[str, str]:
        out = {"MESSAGE": render_text(d), "MESSAGE_ID": MESSAGE_IDS[decision_kind(d)],
               "PRIORITY": str(_PRIORITY[d.verdict]), "SYSLOG_IDENTIFIER": "trustdb"}
        for k, v in d.to_dict().items():
            out[JOURNAL_PREFIX + k.upper()] = str(v)
        if d.denied and d.path.startswith("/"):
            out[JOURNAL_PREFIX + "DIGEST"] = self._digest_of(d.path)
        return out

    def serialize(self, decision: Decision) -> bytes:
        parts = []
        for k, v in self.fields(decision).items():
            raw = v.encode("utf-8", "surrogateescape")
            if b"\n" in raw:
                parts.append(k.encode() + b"\n" + struct.pack("<Q", len(raw)) + raw + b"\n")
            else:
                parts.append(k.encode() + b"=" + raw + b"\n")
        return b"".join(parts)


MAX_DIGEST_BYTES = 64 << 20
"""Denied files larger than this get no TRUSTDB_DIGEST: a loop of denied execs of a huge file
must not make the daemon hash gigabytes."""


def _current_digest(path: str) -> str:
    import os

    from trustdb.hashing import HashingError, hash_file

    try:
        if os.stat(path).st_size > MAX_DIGEST_BYTES:
            return ""
        return hash_file(path).digests.blake3.hex()
    except (HashingError, OSError):
        return ""


def from_journal(record: dict[str, Any]) -> Decision:
    """A `journalctl -o json` record written by JournalSerializer -> Decision."""
    fields = {k[len(JOURNAL_PREFIX):].lower(): v for k, v in record.items()
              if k.startswith(JOURNAL_PREFIX) and k != JOURNAL_PREFIX + "DIGEST"}
    try:
        return Decision.from_dict(fields)
    except (KeyError, TypeError) as e:
        raise ValueError(f"not a trustdb decision: {e}") from e
