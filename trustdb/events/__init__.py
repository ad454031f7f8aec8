"""Decision events, the last pipeline stage: ring buffer record -> `Decision` -> log.

The BPF programs decide; this package only says what they decided (Santa's split):
    decision     the frozen `Decision`, its named reasons, decoding a `struct td_event`
    serializers  Decision -> bytes: JSON lines (the record `trustdb log` reads), text, journal
    writers      bytes -> file, syslog, journal, null; reading the file log back
    logger       one serializer + one writer; the ring buffer's consumers (EventSink/Reader)
Everything is re-exported here: `from trustdb.events import Decision` keeps working.
"""

from __future__ import annotations

from trustdb.events.decision import *
from trustdb.events.decision import (  # noqa: F401  private helpers other stages use
    _c_string,
    _dev_from_str,
    _dev_str,
    _enum_name,
    _enum_value,
)
from trustdb.events.logger import *
from trustdb.events.serializers import *
from trustdb.events.writers import *
