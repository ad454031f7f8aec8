"""Decision events: a ctypes `struct td_event` -> Decision -> JSON line -> Decision, the text
rendering, the writers (a real file, a real datagram socket), and `trustdb log` as a subprocess.
"""

from __future__ import annotations

import datetime as dt
import json
import os
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from trustdb import events
from trustdb.abi import BackendId, CEvent, CInodeKey, Hook, Mode, Reason, Verdict
from trustdb.events import (
    REASON_MPROTECT_EXEC,
    REASON_TAMPER_CGROUP_ESCAPE,
    REASON_TAMPER_SIGNAL_SUPERVISOR,
    REASON_TRUSTED,
    REASON_UNTRUSTED_EXEC,
    REASON_UNTRUSTED_MMAP,
    REASON_UNVERIFIABLE,
    Decision,
    EventSink,
    FileWriter,
    JsonLinesSerializer,
    Logger,
    SyslogWriter,
    TextSerializer,
    decode_event,
    follow_lines,
    parse_json_line,
    render_text,
)
from trustdb.model import InodeKey

KDEV = (254 << 20) | 3


def c_event(
    *,
    hook: Hook = Hook.EXEC,
    verdict: Verdict = Verdict.DENY,
    reason: int = 1,
    path: bytes = b"/tmp/untrusted",
    ago_ns: int = 0,
) -> CEvent:
    ev = CEvent()
    ev.time_ns = time.clock_gettime_ns(time.CLOCK_BOOTTIME) - ago_ns
    ev.pid, ev.tgid, ev.ppid, ev.uid = 4242, 4240, 4000, 1000
    ev.file = CInodeKey.from_key(InodeKey(KDEV, 123456, 1_700_000_000, 5))
    ev.hook, ev.verdict, ev.mode, ev.backend = hook, verdict, Mode.ENFORCE, BackendId.TRACEPOINT
    ev.reason = reason
    ev.comm = b"agent"
    ev.path = path
    return ev


def test_round_trip_through_the_ring_buffer_bytes_and_json() -> None:
    raw = bytes(c_event(ago_ns=2_000_000_000))  # what ring_buffer__poll hands over
    decision = Decision.from_event(decode_event(raw), "tracepoint")
    assert (decision.pid, decision.tgid, decision.ppid, decision.uid) == (4242, 4240, 4000, 1000)
    assert (decision.comm, decision.path, decision.dev, decision.ino) == (
        "agent",
        "/tmp/untrusted",
        KDEV,
        123456,
    )
    assert (decision.hook, decision.verdict, decision.mode) == (
        Hook.EXEC,
        Verdict.DENY,
        Mode.ENFORCE,
    )
    assert decision.reason == REASON_UNTRUSTED_EXEC and decision.denied
    # Boot-time ns became wall-clock time: two seconds ago, give or take scheduling.
    age = dt.datetime.now(dt.UTC) - decision.time
    assert dt.timedelta(seconds=1.5) < age < dt.timedelta(seconds=3)
    line = JsonLinesSerializer().serialize(decision)
    assert line.endswith(b"\n") and line.count(b"\n") == 1
    record = json.loads(line)
    assert record["dev"] == "254:3" and record["verdict"] == "deny" and record["hook"] == "exec"
    assert record["time"].endswith("Z") and record["backend"] == "tracepoint"
    assert parse_json_line(line) == decision


def test_backend_name_comes_from_the_event_when_not_given() -> None:
    assert Decision.from_event(c_event()).backend == "tracepoint"
    ev = c_event()
    ev.backend = BackendId.LSM
    assert Decision.from_event(ev).backend == "lsm"


@pytest.mark.parametrize(
    ("hook", "verdict", "code", "reason"),
    [
        (Hook.EXEC, Verdict.ALLOW, 0, REASON_TRUSTED),
        (Hook.EXEC, Verdict.DENY, 1, REASON_UNTRUSTED_EXEC),
        (Hook.MMAP, Verdict.AUDIT_DENY, 1, REASON_UNTRUSTED_MMAP),
        (Hook.MPROTECT, Verdict.DENY, 1, REASON_MPROTECT_EXEC),
        (Hook.MMAP, Verdict.DENY, 2, REASON_UNVERIFIABLE),
        (Hook.TAMPER, Verdict.DENY, 3, REASON_TAMPER_CGROUP_ESCAPE),
        (Hook.TAMPER, Verdict.DENY, 4, REASON_TAMPER_SIGNAL_SUPERVISOR),
        (Hook.TAMPER, Verdict.DENY, 99, "unknown_99"),
    ],
)
def test_named_reasons(hook: Hook, verdict: Verdict, code: int, reason: str) -> None:
    d = Decision.from_event(c_event(hook=hook, verdict=verdict, reason=code), "tracepoint")
    assert d.reason == reason
    assert d.denied == (verdict != Verdict.ALLOW)
    assert parse_json_line(JsonLinesSerializer().serialize(d)) == d


def test_every_kernel_reason_has_a_named_constant() -> None:
    named = {v for k, v in vars(events).items() if k.startswith("REASON_")}
    for code in Reason:
        code_rules = (Reason.WRITABLE, Reason.ANON_EXEC, Reason.UNTRUSTED_SCRIPT, Reason.PROC_MEM)
        tamper = code > Reason.UNVERIFIABLE and code not in code_rules
        hooks = [Hook.TAMPER] if tamper else [Hook.EXEC, Hook.MMAP]
        for hook in hooks:
            assert events.reason_name(hook, code) in named, (hook, code)


def test_exe_of_the_process() -> None:
    assert Decision.from_event(c_event()).exe == "/tmp/untrusted"  # exec: the file itself
    ev = c_event(hook=Hook.MMAP, path=b"/tmp/libevil.so")
    ev.tgid = os.getpid()
    d = Decision.from_event(ev, "tracepoint")
    assert d.exe == os.path.realpath(sys.executable)
    assert f"exe={d.exe}" in render_text(d)
    ev.tgid = 0x3FFFFFFF  # no such process (killed before we looked)
    assert Decision.from_event(ev, "tracepoint").exe == ""
    assert Decision.from_event(ev, "tracepoint", exe_of=lambda tgid: "/x").exe == "/x"
    # Lines written before the field existed still parse.
    record = json.loads(JsonLinesSerializer().serialize(d))
    del record["exe"]
    assert parse_json_line(json.dumps(record)).exe == ""


def test_text_rendering() -> None:
    d = Decision.from_event(c_event(hook=Hook.MMAP, verdict=Verdict.AUDIT_DENY), "tracepoint")
    text = render_text(d)
    for part in (
        "WOULD-DENY",
        "mmap",
        "/tmp/untrusted",
        "agent[4240]",
        "uid=1000",
        "(untrusted_mmap)",
        "dev=254:3",
        "ino=123456",
        "enforce/tracepoint",
    ):
        assert part in text, (part, text)
    assert "\n" not in text
    assert TextSerializer().serialize(d) == text.encode() + b"\n"


def test_non_utf8_path_survives_json_and_renders() -> None:
    d = Decision.from_event(c_event(path=b"/tmp/caf\xe9-\xff"), "tracepoint")
    line = JsonLinesSerializer().serialize(d)
    line.decode("ascii")  # pure ASCII on disk
    back = parse_json_line(line)
    assert os.fsencode(back.path) == b"/tmp/caf\xe9-\xff"
    assert b"\\udce9" in TextSerializer().serialize(d)  # escaped, never a crash


def test_bad_records_are_value_errors() -> None:
    for bad in ("", "[]", "{}", '{"time": "x"}', "not json"):
        with pytest.raises(ValueError):
            parse_json_line(bad)
    good = json.loads(JsonLinesSerializer().serialize(Decision.from_event(c_event())))
    good["hook"] = "teleport"
    with pytest.raises(ValueError, match="unknown hook"):
        parse_json_line(json.dumps(good))
    with pytest.raises(ValueError, match="short event"):
        decode_event(b"\0" * 10)


def test_event_sink_survives_bad_samples_and_failing_consumers() -> None:
    got: list[Decision] = []

    def broken(d: Decision) -> None:
        raise OSError("disk full")

    sink = EventSink("tracepoint", broken, got.append)
    assert sink.on_sample(b"short") is None and sink.dropped == 1
    d = sink.on_sample(bytes(c_event()) + b"\0" * 8)  # ring buffer records may be padded
    assert d is not None and got == [d]
    assert any("disk full" in e for e in sink.errors) and sink.failures == 1
    for _ in range(500):
        sink.on_sample(bytes(c_event()))
    assert sink.failures == 501 and len(sink.errors) == 100  # bounded


def test_file_logger_appends_and_follows_rotation(tmp_path: Path) -> None:
    path = tmp_path / "log" / "decisions.jsonl"
    logger = Logger.create("file", path=path)
    a = Decision.from_event(c_event(), "tracepoint")
    b = Decision.from_event(c_event(hook=Hook.MMAP), "tracepoint")
    logger.log(a)
    logger.log(b)
    assert [parse_json_line(x) for x in path.read_text().splitlines()] == [a, b]
    assert oct(path.stat().st_mode & 0o777) == oct(0o640)
    path.rename(tmp_path / "log" / "decisions.jsonl.1")  # logrotate
    logger.log(a)
    logger.close()
    assert [parse_json_line(x) for x in path.read_text().splitlines()] == [a]


def test_logger_switch() -> None:
    assert isinstance(Logger.create("null").serializer, JsonLinesSerializer)
    with pytest.raises(ValueError, match="destination"):
        Logger.create("carrier-pigeon")
    with pytest.raises(ValueError, match="format"):
        Logger.create("null", fmt="xml")


def test_default_log_path_from_env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TRUSTDB_LOG", str(tmp_path / "x.jsonl"))
    w = FileWriter()
    w.write(b"{}\n")
    w.close()
    assert (tmp_path / "x.jsonl").read_bytes() == b"{}\n"


def test_syslog_writer_sends_rfc3164_datagrams(tmp_path: Path) -> None:
    address = str(tmp_path / "log.sock")
    server = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    server.bind(address)
    server.settimeout(5)
    try:
        writer = SyslogWriter(address)
        if writer._sock is None:
            pytest.skip("python-systemd is installed: the writer sends to the journal instead")
        logger = Logger(TextSerializer(), writer)
        d = Decision.from_event(c_event(), "tracepoint")
        logger.log(d)
        logger.close()
        message = server.recv(4096).decode()
    finally:
        server.close()
    assert message == f"<85>trustdb[{os.getpid()}]: {render_text(d)}"
    # No listener: a courtesy copy, never an error.
    SyslogWriter(str(tmp_path / "nobody")).write(b"x\n")


def test_follow_lines_holds_a_partial_line_until_its_newline(tmp_path: Path) -> None:
    path = tmp_path / "d.jsonl"
    big = b"".join(b"%d %s\n" % (i, b"x" * (i % 700)) for i in range(5000))  # > many reads
    path.write_bytes(big)
    assert list(follow_lines(path, follow=False)) == big.decode().splitlines()
    path.write_bytes(b"one\ntw")
    assert list(follow_lines(path, follow=False)) == ["one", "tw"]
    seen: list[str] = []
    done = threading.Event()

    def reader() -> None:
        seen.extend(follow_lines(path, follow=True, interval=0.02, stop=done.is_set))

    t = threading.Thread(target=reader)
    t.start()
    try:
        _wait_for(lambda: seen == ["one"])
        with open(path, "ab") as f:
            f.write(b"o\nthr")
        _wait_for(lambda: seen == ["one", "two"])
        time.sleep(0.1)
        assert seen == ["one", "two"]  # "thr" is not a line yet
        path.write_bytes(b"fresh\n")  # truncated and rewritten: read from the start
        _wait_for(lambda: seen[-1:] == ["fresh"])
    finally:
        done.set()
        t.join(5)


def _wait_for(cond: object, timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if callable(cond) and cond():
            return
        time.sleep(0.01)
    raise AssertionError("condition not met in time")


# --- the `trustdb log` command, as a user runs it ------------------------------------------


def trustdb(*args: str) -> list[str]:
    return [sys.executable, "-c", "from trustdb.cli import main; main()", *args]


def test_log_command_text_and_json(tmp_path: Path) -> None:
    path = tmp_path / "d.jsonl"
    logger = Logger.create("file", path=path)
    decisions = [
        Decision.from_event(c_event(), "tracepoint"),
        Decision.from_event(c_event(hook=Hook.TAMPER, reason=3, path=b""), "tracepoint"),
    ]
    for d in decisions:
        logger.log(d)
    logger.close()
    with open(path, "ab") as f:
        f.write(b"garbage\n")
    text = subprocess.run(
        trustdb("log", "--file", str(path)), check=False, capture_output=True, text=True
    )
    assert text.returncode == 0, text.stderr
    assert text.stdout.splitlines() == [render_text(d) for d in decisions]
    assert "record 3 skipped" in text.stderr
    env = dict(os.environ, TRUSTDB_LOG=str(path))
    js = subprocess.run(
        trustdb("log", "--json"), check=False, capture_output=True, text=True, env=env
    )
    assert [parse_json_line(x) for x in js.stdout.splitlines()] == decisions
    missing = subprocess.run(
        trustdb("log", "--file", str(tmp_path / "none")),
        check=False,
        capture_output=True,
        text=True,
    )
    assert missing.returncode == 4  # the exit-code table: 4 = no such file or database
    assert missing.stderr.strip() == (
        f"trustdb: error: no decision log at {tmp_path / 'none'} (set --file or TRUSTDB_LOG)"
    )


def test_log_follow_sees_a_line_appended_later(tmp_path: Path) -> None:
    path = tmp_path / "d.jsonl"
    first = Decision.from_event(c_event(), "tracepoint")
    later = Decision.from_event(c_event(hook=Hook.MPROTECT), "tracepoint")
    path.write_bytes(JsonLinesSerializer().serialize(first))
    proc = subprocess.Popen(
        trustdb("log", "--follow", "--file", str(path)),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert proc.stdout is not None
        assert proc.stdout.readline().rstrip("\n") == render_text(first)
        line = JsonLinesSerializer().serialize(later)
        with open(path, "ab") as f:  # a writer caught mid-record: two writes
            f.write(line[:20])
            f.flush()
            time.sleep(0.3)
            f.write(line[20:])
        got: list[str] = []
        reader = threading.Thread(target=lambda: got.append(proc.stdout.readline()))  # type: ignore[union-attr]
        reader.start()
        reader.join(10)
        assert got == [render_text(later) + "\n"], proc.stderr
    finally:
        proc.terminate()
        proc.wait(10)
