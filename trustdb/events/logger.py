"""The logger (one serializer + one writer, Santa's Logger) and the ring buffer's consumers."""

from __future__ import annotations

import threading
from collections import deque
from collections.abc import Callable
from pathlib import Path
from typing import Self

from trustdb.events.decision import Decision, decode_event
from trustdb.events.serializers import (
    JournalSerializer,
    JsonLinesSerializer,
    Serializer,
    TextSerializer,
)
from trustdb.events.writers import FileWriter, JournalWriter, NullWriter, SyslogWriter, Writer

SERIALIZERS: dict[str, Callable[[], Serializer]] = {
    "json": JsonLinesSerializer,
    "text": TextSerializer,
    "journal": JournalSerializer,
}


class Logger:
    """Pairs one serializer with one writer (Santa's Logger)."""

    def __init__(self, serializer: Serializer, writer: Writer) -> None:
        self.serializer = serializer
        self.writer = writer

    @classmethod
    def create(
        cls, destination: str = "file", *, fmt: str | None = None, path: Path | None = None
    ) -> Logger:
        """The one switch: `file` (JSON lines by default, at `path` or $TRUSTDB_LOG or
        /var/log/trustdb/decisions.jsonl), `syslog` (text by default), `journal` (structured
        fields, a MESSAGE_ID per kind of decision), or `null`."""
        writer: Writer
        if destination == "file":
            writer, default_fmt = FileWriter(path), "json"
        elif destination == "syslog":
            writer, default_fmt = SyslogWriter(), "text"
        elif destination == "journal":
            writer, default_fmt = JournalWriter(), "journal"
        elif destination == "null":
            writer, default_fmt = NullWriter(), "json"
        else:
            raise ValueError(f"unknown log destination {destination!r} (file, syslog, journal, null)")
        fmt = fmt or default_fmt
        if fmt not in SERIALIZERS:
            raise ValueError(f"unknown log format {fmt!r} (json, text, journal)")
        return cls(SERIALIZERS[fmt](), writer)

    def log(self, decision: Decision) -> None:
        self.writer.write(self.serializer.serialize(decision))

    def close(self) -> None:
        self.writer.close()


class EventSink:
    """Turns raw ring buffer samples into Decisions and hands each to every consumer (the
    logger, the `trustdb run` stderr reporter...). A consumer that raises does not stop the
    others: losing a log line must not lose the next decision."""

    def __init__(self, backend_name: str, *consumers: Callable[[Decision], None]) -> None:
        self.backend_name = backend_name
        self.consumers = list(consumers)
        self.dropped = 0
        """Samples that could not be decoded (a mismatched BPF object)."""
        self.failures = 0
        """Consumer calls that raised (e.g. the log's disk is full)."""
        self.errors: deque[str] = deque(maxlen=100)
        """The latest decode and consumer errors (bounded: a daemon runs for months)."""

    def on_sample(self, data: bytes) -> Decision | None:
        try:
            decision = Decision.from_event(decode_event(data), self.backend_name)
        except ValueError as e:
            self.dropped += 1
            self.errors.append(str(e))
            return None
        for consume in self.consumers:
            try:
                consume(decision)
            except Exception as e:  # noqa: BLE001 - keep delivering to the other consumers
                self.failures += 1
                self.errors.append(f"{getattr(consume, '__qualname__', consume)}: {e}")
        return decision


class EventReader:
    """Polls the backend's ring buffer (`Backend.events_fd`) and feeds each record to an
    EventSink. Poll from one thread; `run` loops until `stop` is set."""

    def __init__(self, events_fd: int, sink: EventSink) -> None:
        from trustdb.libbpf import RingBuffer  # only the daemon needs libbpf, not `trustdb log`

        self.sink = sink
        self._rb = RingBuffer(events_fd, self._on_record)

    def _on_record(self, data: bytes) -> None:
        self.sink.on_sample(data)

    def poll(self, timeout_ms: int = 100) -> int:
        """Wait up to timeout_ms; returns how many records were handled."""
        return self._rb.poll(timeout_ms)

    def drain(self) -> int:
        """Handle every record already in the buffer (at shutdown, before detaching)."""
        return self._rb.consume()

    def run(self, stop: threading.Event, timeout_ms: int = 100) -> None:
        while not stop.is_set():
            self.poll(timeout_ms)
        self.drain()

    @property
    def fileno(self) -> int:
        """epoll fd, readable when records wait (for a select loop)."""
        return self._rb.epoll_fd

    def close(self) -> None:
        self._rb.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

