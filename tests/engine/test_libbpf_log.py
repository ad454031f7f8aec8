"""libbpf's log around a load (trustdb.libbpf): silent while the programs load (no trip
through the GIL per line), yet a failed load still says why, in libbpf's own words.

Loads only, never attaches: nothing here can deny anything.
"""

from __future__ import annotations

import threading

import pytest

from tests.engine.conftest import OBJ
from trustdb.libbpf import BpfObject, LibbpfError
from trustdb.libbpf_calls import silent_log

pytestmark = [pytest.mark.root, pytest.mark.bpf]


def _load_with_no_room() -> LibbpfError:
    """A load that fails the same way on every kernel: a hash map of 0 entries (EINVAL at
    map creation, which libbpf explains at WARN level)."""
    obj = BpfObject(OBJ)
    try:
        obj.set_max_entries("trusted_inodes", 0)
        with pytest.raises(LibbpfError) as got:
            obj.load()
        return got.value
    finally:
        obj.close()


def test_a_failed_silent_load_still_carries_libbpf_s_explanation() -> None:
    e = _load_with_no_room()
    assert e.errno != 0
    assert "trusted_inodes" in e.log and "libbpf:" in e.log, e.log
    assert str(e).startswith("load tracepoint.bpf.o: ")


def test_a_probe_s_load_does_not_pay_for_an_explanation() -> None:
    obj = BpfObject(OBJ)
    try:
        obj.set_max_entries("trusted_inodes", 0)
        with pytest.raises(LibbpfError) as got:
            obj.load(explain=False)
    finally:
        obj.close()
    assert got.value.log == ""


def test_the_log_comes_back_after_silent_blocks_on_several_threads() -> None:
    """Nested and concurrent silent blocks: the log is on again once the last one ends."""
    inside = threading.Barrier(3)
    leave = threading.Event()

    def hold() -> None:
        with silent_log():
            inside.wait()
            leave.wait(10)

    threads = [threading.Thread(target=hold) for _ in range(2)]
    for t in threads:
        t.start()
    with silent_log():
        inside.wait()
    leave.set()
    for t in threads:
        t.join()
    e = _load_with_no_room()
    assert "libbpf:" in e.log


def test_a_successful_load_after_a_failed_one() -> None:
    _load_with_no_room()
    with BpfObject(OBJ) as obj:
        obj.set_max_entries("trusted_inodes", 16)
        obj.load()
        assert obj.loaded
