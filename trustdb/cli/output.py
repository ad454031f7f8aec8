"""How verbs print: JSON on stdout (snake_case keys, ISO-8601 UTC times, digests as hex, one
name per concept: `source` for a trust source's label), and text lines that --quiet silences.

Every JSON document a verb prints has a schema in schemas/<verb>.json (tests/cli/test_schemas.py
validates real output against them)."""

from __future__ import annotations

import json
import sys
import time
from collections.abc import Iterable
from datetime import UTC, datetime
from typing import Any

from trustdb.dbrecords import PathRecord, SourceRecord


def iso_time(t: float | None) -> str | None:
    """Unix time -> `2026-12-01T20:37:39.123456+00:00` (None stays None)."""
    if t is None:
        return None
    return datetime.fromtimestamp(t, tz=UTC).isoformat()


def local_time(t: float) -> str:
    """For text output: local time, to the second."""
    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(t))


def print_json(value: Any) -> None:
    json.dump(value, sys.stdout, indent=2)
    sys.stdout.write("\n")


def print_json_array(items: Iterable[Any]) -> None:
    """`print_json(list(items))`, written item by item: a million entries are never all in
    memory at once (the same text: json's indent=2 layout)."""
    out = sys.stdout
    first = True
    for item in items:
        out.write("[\n  " if first else ",\n  ")
        out.write(json.dumps(item, indent=2).replace("\n", "\n  "))  # strings escape \n
        first = False
    out.write("[]\n" if first else "\n]\n")


def path_record_json(r: PathRecord) -> dict[str, Any]:
    return {
        "path": r.path,
        "source": r.label,
        "digest": r.digest.hex(),
        "origin": r.origin or None,
        "trusted_at": iso_time(r.trusted_at),
    }


def source_record_json(s: SourceRecord) -> dict[str, Any]:
    return {
        "source": s.label,
        "kind": s.kind,
        "entries": s.entries,
        "updated_at": iso_time(s.updated),
    }


def human_size(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} GiB"
