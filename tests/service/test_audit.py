"""The audit-mode summary, from real decision records (the JSON-lines format the log writes)."""

from __future__ import annotations

import datetime as dt

from trustdb.abi import Hook, Mode, Verdict
from trustdb.events import Decision
from trustdb.service.audit import summarize


def _d(path: str, hook: Hook, verdict: Verdict, exe: str = "") -> Decision:
    return Decision(time=dt.datetime.now(dt.UTC), pid=1, tgid=1, ppid=0, uid=0,
                    comm="x", path=path, dev=0, ino=1, hook=hook, verdict=verdict,
                    mode=Mode.AUDIT, backend="lsm", reason="untrusted_exec", exe=exe)


def test_grouped_by_file_and_program_with_commands() -> None:
    s = summarize([
        _d("/opt/tool", Hook.EXEC, Verdict.AUDIT_DENY, exe="/opt/tool"),
        _d("/opt/tool", Hook.EXEC, Verdict.AUDIT_DENY, exe="/opt/tool"),
        _d("/opt/lib/plugin.so", Hook.MMAP, Verdict.AUDIT_DENY, exe="/usr/bin/editor"),
        _d("/usr/bin/ls", Hook.EXEC, Verdict.ALLOW),
    ])
    assert s.total == 3
    assert [(f.path, f.count) for f in s.files] == [("/opt/tool", 2), ("/opt/lib/plugin.so", 1)]
    assert s.programs["/usr/bin/editor"] == ["/opt/lib/plugin.so"]
    text = "\n".join(s.lines())
    assert "trustdb trust /opt/tool" in text and "trustdb trust /opt/lib/plugin.so" in text


def test_nothing_denied() -> None:
    assert summarize([]).lines() == ["nothing would have been denied"]
