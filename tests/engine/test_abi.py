"""trustdb/abi.py against the BTF of the built BPF objects: sizes, offsets, enum values.

A field added to bpf/trustdb.h and not to abi.py (or the reverse) fails here rather than as
garbled events at run time (Tetragon's alignchecker). Reads BTF with `bpftool -j`.
"""

from __future__ import annotations

import ctypes
import enum
import json
import subprocess
from pathlib import Path
from typing import Any

import pytest

from trustdb import abi

REPO = Path(__file__).resolve().parents[2]
BUILD = REPO / "build" / "bpf"

STRUCTS: dict[str, type[ctypes.Structure]] = {
    "td_inode_key": abi.CInodeKey,
    "td_event": abi.CEvent,
    "td_task": abi.CTask,
    "td_config": abi.CConfig,
    "td_first_seen_group": abi.CFirstSeenGroup,
}
ENUMS: dict[str, tuple[type[enum.IntEnum | enum.IntFlag], str]] = {
    "td_hook": (abi.Hook, "TD_HOOK_"),
    "td_verdict": (abi.Verdict, "TD_"),
    "td_mode": (abi.Mode, "TD_MODE_"),
    "td_backend": (abi.BackendId, "TD_BACKEND_"),
    "td_reason": (abi.Reason, "TD_REASON_"),
    "td_protect": (abi.Protect, "TD_PROTECT_"),
    "td_program_flag": (abi.ProgramFlag, "TD_PROGRAM_"),
    "td_mode_rule": (abi.ModeRule, "TD_MODE_RULE_"),
}


def _btf(obj: Path) -> dict[int, dict[str, Any]]:
    out = subprocess.run(
        ["bpftool", "-j", "btf", "dump", "file", str(obj), "format", "raw"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    return {t["id"]: t for t in json.loads(out)["types"]}


@pytest.fixture(scope="module")
def objects() -> list[Path]:
    subprocess.run(["make", "-s", "-C", str(REPO / "bpf")], check=True)
    objs = sorted(BUILD.glob("*.bpf.o"))
    assert BUILD / "abi_check.bpf.o" in objs
    return objs


def _named(types: dict[int, dict[str, Any]], kind: str, name: str) -> dict[str, Any] | None:
    for t in types.values():
        if t["kind"] == kind and t.get("name") == name:
            return t
    return None


def test_abi_check_object_has_every_struct_and_enum(objects: list[Path]) -> None:
    types = _btf(BUILD / "abi_check.bpf.o")
    for name in STRUCTS:
        assert _named(types, "STRUCT", name), name
    for name in ENUMS:
        assert _named(types, "ENUM", name), name


@pytest.mark.parametrize("name", sorted(STRUCTS))
def test_struct_layout(objects: list[Path], name: str) -> None:
    cls = STRUCTS[name]
    checked = 0
    for obj in objects:
        types = _btf(obj)
        t = _named(types, "STRUCT", name)
        if t is None:
            continue  # this object does not use the struct
        checked += 1
        assert t["size"] == ctypes.sizeof(cls), f"{obj.name}: sizeof {name}"
        c_fields = [(m["name"], m["bits_offset"] // 8) for m in t["members"]]
        py_fields = [(f[0], getattr(cls, f[0]).offset) for f in cls._fields_]
        assert c_fields == py_fields, f"{obj.name}: {name} fields/offsets"
        for m, f in zip(t["members"], cls._fields_, strict=True):
            assert getattr(cls, f[0]).size == _size(types, m["type_id"]), f"{name}.{m['name']}"
    assert checked, f"no built object has struct {name}"


def _size(types: dict[int, dict[str, Any]], tid: int) -> int:
    t = types[tid]
    kind = t["kind"]
    if kind in ("TYPEDEF", "VOLATILE", "CONST"):
        return _size(types, t["type_id"])
    if kind == "ARRAY":
        return int(t["nr_elems"]) * _size(types, t["type_id"])
    return int(t["size"])


@pytest.mark.parametrize("name", sorted(ENUMS))
def test_enum_values(objects: list[Path], name: str) -> None:
    py, prefix = ENUMS[name]
    t = _named(_btf(BUILD / "abi_check.bpf.o"), "ENUM", name)
    assert t is not None
    c_values = {v["name"].removeprefix(prefix): v["val"] for v in t["values"]}
    assert c_values == {m.name: int(m.value) for m in py}  # type: ignore[union-attr]


def test_comm_and_path_lengths() -> None:
    assert abi.CEvent.comm.size == abi.TD_COMM_LEN
    assert abi.CEvent.path.size == abi.TD_PATH_LEN
