"""The journal serializer/writer: native protocol records on a real AF_UNIX datagram socket
(as journald reads them), a MESSAGE_ID per kind, and `from_journal` back to the Decision."""

from __future__ import annotations

import datetime as dt
import socket
import struct
from pathlib import Path

from trustdb.abi import Hook, Mode, Verdict
from trustdb.events import (
    MESSAGE_IDS,
    Decision,
    JournalSerializer,
    JournalWriter,
    Logger,
    from_journal,
)


def _decision(hook: Hook, verdict: Verdict, path: str = "/bin/true") -> Decision:
    return Decision(time=dt.datetime(2026, 12, 1, 12, 0, tzinfo=dt.UTC), pid=7, tgid=7, ppid=1,
                    uid=0, comm="true", path=path, dev=(254 << 20) | 1, ino=42, hook=hook,
                    verdict=verdict, mode=Mode.ENFORCE, backend="lsm", reason="untrusted_exec",
                    exe=path)


def _parse(record: bytes) -> dict[str, str]:
    out: dict[str, str] = {}
    while record:
        line, _sep, rest = record.partition(b"\n")
        if b"=" in line:
            k, v = line.split(b"=", 1)
            out[k.decode()] = v.decode()
            record = rest
        else:  # binary form: KEY\n<le64 length><value>\n
            (n,) = struct.unpack("<Q", rest[:8])
            out[line.decode()] = rest[8:8 + n].decode()
            record = rest[8 + n + 1:]
    return out


def test_fields_message_id_and_digest_round_trip(tmp_path: Path) -> None:
    path = str(tmp_path / "journal")
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(path)
    d = _decision(Hook.EXEC, Verdict.DENY)
    Logger(JournalSerializer(), JournalWriter(path)).log(d)
    fields = _parse(sock.recv(65536))
    assert fields["MESSAGE_ID"] == MESSAGE_IDS["exec-denied"]
    assert fields["TRUSTDB_PATH"] == "/bin/true" and fields["TRUSTDB_PID"] == "7"
    assert fields["TRUSTDB_EXE"] == "/bin/true" and len(fields["TRUSTDB_DIGEST"]) == 64
    assert fields["PRIORITY"] == "4" and fields["SYSLOG_IDENTIFIER"] == "trustdb"
    assert from_journal(fields) == d
    sock.close()


def test_one_message_id_per_kind() -> None:
    s = JournalSerializer(digest_of=lambda p: "")
    ids = {s.fields(_decision(h, v))["MESSAGE_ID"] for h, v in [
        (Hook.EXEC, Verdict.DENY), (Hook.MMAP, Verdict.DENY), (Hook.MPROTECT, Verdict.DENY),
        (Hook.EXEC, Verdict.AUDIT_DENY), (Hook.TAMPER, Verdict.DENY), (Hook.EXEC, Verdict.ALLOW)]}
    assert ids == set(MESSAGE_IDS.values())


def test_no_journal_drops_quietly(tmp_path: Path) -> None:
    w = JournalWriter(str(tmp_path / "nobody"))
    w.write(b"MESSAGE=x\n")
    assert w.dropped == 1
    w.close()
