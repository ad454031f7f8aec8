"""The one ctypes module over libbpf (Debian's libbpf.so.1, 1.1.x).

Every call into libbpf goes through here; backends never touch ctypes. The usual life of an
object, each step one method (libbpf-bootstrap's order):

    with BpfObject(path) as obj:                 # bpf_object__open_file
        obj.set_rodata("td_cfg", bytes(cfg))     # const volatile globals, before load
        obj.set_max_entries("trusted_inodes", n) # map sizes, before load
        obj.load()                               # verifier runs here; log in the exception
        obj.attach_all()                         # links are kept by the object
        m = obj.map("trusted_inodes"); m.update(key, value)
        rb = RingBuffer(obj.map("events").fd, on_record); rb.poll(100)
    # close() destroys links and the object: nothing stays attached, unless pinned
    # (pin_links, pin_map: the system-wide service's fail-closed lifetime, trustdb.service.pins)

Errors are `LibbpfError` (an OSError carrying errno) with libbpf's last log lines, which include
the verifier's complaint when a load fails.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno as errno_mod
import os
from collections.abc import Callable, Sequence
from pathlib import Path
from types import TracebackType
from typing import Self

from trustdb.libbpf_calls import (
    BPF_ANY,
    BPF_EXIST,
    BPF_NOEXIST,
    LibbpfError,
    OpenOpts,
    _check,
    _check_ptr,
    _clear_log,
    _lib,
    _take_log,
    silent_log,
)
from trustdb.libbpf_ringbuf import RingBuffer  # re-exported

__all__ = [
    "BPF_ANY",
    "BPF_EXIST",
    "BPF_NOEXIST",
    "BpfMap",
    "BpfObject",
    "LibbpfError",
    "RingBuffer",
    "held_program_ids",
    "open_pinned_map",
]

_BTF_KIND_VAR = 14
_BTF_KIND_DATASEC = 15
_BPF_LD_IMM64 = 0x18
_PSEUDO_MAP_SRC = frozenset({1, 2, 5, 6})
"""BPF_PSEUDO_MAP_FD, _MAP_VALUE, _MAP_IDX, _MAP_IDX_VALUE: an imm that differs per load."""


class _BtfType(ctypes.Structure):
    _fields_ = [("name_off", ctypes.c_uint32), ("info", ctypes.c_uint32), ("size", ctypes.c_uint32)]


class _BtfVarSecinfo(ctypes.Structure):
    _fields_ = [("type", ctypes.c_uint32), ("offset", ctypes.c_uint32), ("size", ctypes.c_uint32)]


class _MapInfo(ctypes.Structure):
    """The head of struct bpf_map_info (the kernel fills what fits in the size we pass)."""

    _fields_ = [
        ("type", ctypes.c_uint32),
        ("id", ctypes.c_uint32),
        ("key_size", ctypes.c_uint32),
        ("value_size", ctypes.c_uint32),
        ("max_entries", ctypes.c_uint32),
        ("map_flags", ctypes.c_uint32),
        ("name", ctypes.c_char * 16),
    ]


class _BatchOpts(ctypes.Structure):
    """struct bpf_map_batch_opts (libbpf 1.1)."""

    _fields_ = [
        ("sz", ctypes.c_size_t),
        ("elem_flags", ctypes.c_uint64),
        ("flags", ctypes.c_uint64),
    ]


# ---- maps ---------------------------------------------------------------------------------


class BpfMap:
    """A map of a loaded object, used by fd. Keys and values are bytes of the exact size."""

    def __init__(self, fd: int, name: str, key_size: int, value_size: int,
                 max_entries: int = 0) -> None:
        self.fd = fd
        self.name = name
        self.key_size = key_size
        self.value_size = value_size
        self.max_entries = max_entries
        """As the kernel reports it (pinned maps); 0 when not asked."""

    def update(self, key: bytes, value: bytes, flags: int = BPF_ANY) -> None:
        _check(_lib.bpf_map_update_elem(self.fd, key, value, flags), f"update {self.name}")

    def lookup(self, key: bytes) -> bytes | None:
        out = ctypes.create_string_buffer(self.value_size)
        ret = _lib.bpf_map_lookup_elem(self.fd, key, out)
        if ret == -errno_mod.ENOENT:
            return None
        _check(ret, f"lookup {self.name}")
        return out.raw

    def delete(self, key: bytes) -> bool:
        """Remove `key`; False if it was not there."""
        ret = _lib.bpf_map_delete_elem(self.fd, key)
        if ret == -errno_mod.ENOENT:
            return False
        _check(ret, f"delete {self.name}")
        return True

    def keys(self) -> list[bytes]:
        out: list[bytes] = []
        prev: bytes | None = None
        nxt = ctypes.create_string_buffer(self.key_size)
        while _lib.bpf_map_get_next_key(self.fd, prev, nxt) == 0:
            prev = nxt.raw
            out.append(prev)
        return out

    def keys_batched(self, chunk: int = 8192) -> list[bytes]:
        """Every key of a hash map, `chunk` per bpf() call (`keys` makes one call per key: a
        restart reading a pinned map of 137k keys paid 137k). A kernel or map type without
        batch lookups, or a hash bucket larger than `chunk`, falls back to `keys`."""
        ks = self.key_size
        kbuf = ctypes.create_string_buffer(ks * chunk)
        vbuf = ctypes.create_string_buffer(max(self.value_size, 1) * chunk)
        token_in, token_out = ctypes.c_uint32(0), ctypes.c_uint32(0)  # htab: a bucket index
        opts = _BatchOpts(ctypes.sizeof(_BatchOpts), 0, 0)
        out: list[bytes] = []
        first = True
        while True:
            count = ctypes.c_uint32(chunk)
            ret = _lib.bpf_map_lookup_batch(
                self.fd, None if first else ctypes.byref(token_in), ctypes.byref(token_out),
                kbuf, vbuf, ctypes.byref(count), ctypes.byref(opts))
            if ret < 0 and ret != -errno_mod.ENOENT:
                return self.keys()
            raw = kbuf.raw[: count.value * ks]
            out.extend(raw[i : i + ks] for i in range(0, len(raw), ks))
            if ret == -errno_mod.ENOENT:  # the last bucket was read
                return out
            token_in.value, first = token_out.value, False

    def update_batch(
        self, keys: Sequence[bytes], values: Sequence[bytes], flags: int = BPF_ANY
    ) -> None:
        """One bpf() call for many elements (about 2x faster than one by one)."""
        if len(keys) != len(values):
            raise ValueError("keys and values differ in length")
        if not keys:
            return
        kbuf = b"".join(keys)
        vbuf = b"".join(values)
        if len(kbuf) != self.key_size * len(keys) or len(vbuf) != self.value_size * len(values):
            raise ValueError(f"{self.name}: key/value sizes do not match the map")
        count = ctypes.c_uint32(len(keys))
        opts = _BatchOpts(ctypes.sizeof(_BatchOpts), flags, 0)
        ret = _lib.bpf_map_update_batch(self.fd, kbuf, vbuf, ctypes.byref(count),
                                        ctypes.byref(opts))
        try:
            _check(ret, f"update_batch {self.name} ({count.value}/{len(keys)} done)")
        except LibbpfError as e:
            e.done = count.value  # the kernel stops at the first failure, in order
            raise

    def delete_batch(self, keys: Sequence[bytes]) -> None:
        """Delete many keys in one call. Stops at a missing key with ENOENT, as the kernel does;
        callers that tolerate missing keys use delete() per key instead."""
        if not keys:
            return
        count = ctypes.c_uint32(len(keys))
        opts = _BatchOpts(ctypes.sizeof(_BatchOpts), 0, 0)
        _check(
            _lib.bpf_map_delete_batch(
                self.fd, b"".join(keys), ctypes.byref(count), ctypes.byref(opts)
            ),
            f"delete_batch {self.name} ({count.value}/{len(keys)} done)",
        )


# ---- objects ------------------------------------------------------------------------------


class BpfObject:
    """One BPF object file: open, configure, load, attach, close. A context manager."""

    def __init__(self, path: str | os.PathLike[str], *, core_btf: str | None = None) -> None:
        """`core_btf`: a BTF file to relocate CO-RE accesses against instead of the kernel's
        own (trustdb.corecache: the kernel's BTF cut down to what this object reads); the
        kernel's BTF still gives the attach points. It is read at load()."""
        self.path = Path(path)
        self._links: list[int] = []
        self._link_names: list[str] = []
        self._settings: list[Callable[[BpfObject], None]] = []
        """What was set before load, to set on a copy again (`_explain_failed_load`)."""
        _clear_log()
        ctypes.set_errno(0)
        opts = None
        if core_btf is not None:
            self._opts = OpenOpts(sz=ctypes.sizeof(OpenOpts), btf_custom_path=os.fsencode(core_btf))
            opts = ctypes.byref(self._opts)
        self._obj: int | None = _check_ptr(
            _lib.bpf_object__open_file(os.fsencode(self.path), opts), f"open {self.path}"
        )
        self.loaded = False

    # -- before load

    def _map_ptr(self, name: str) -> int:
        ptr = _lib.bpf_object__find_map_by_name(self._handle, name.encode())
        if not ptr:
            raise LibbpfError(errno_mod.ENOENT, f"{self.path.name}: no map named {name!r}")
        return int(ptr)

    @property
    def _handle(self) -> int:
        if self._obj is None:
            raise LibbpfError(errno_mod.EBADF, f"{self.path.name}: object is closed")
        return self._obj

    def set_max_entries(self, map_name: str, n: int) -> None:
        self._settings.append(lambda o: o.set_max_entries(map_name, n))
        _check(
            _lib.bpf_map__set_max_entries(self._map_ptr(map_name), n), f"set_max_entries {map_name}"
        )

    def set_rodata(self, var: str, data: bytes) -> None:
        """Set a `const volatile` global (in .rodata) before load; `data` is its exact bytes."""
        if self.loaded:
            raise LibbpfError(errno_mod.EBUSY, f"set_rodata {var}: object already loaded")
        offset, size = self._var_location(".rodata", var)
        if len(data) != size:
            raise ValueError(f"{var} is {size} bytes, got {len(data)}")
        self._settings.append(lambda o: o.set_rodata(var, data))
        total = ctypes.c_size_t(0)
        mem = _check_ptr(
            _lib.bpf_map__initial_value(self._map_ptr(".rodata"), ctypes.byref(total)),
            "initial_value .rodata",
        )
        ctypes.memmove(mem + offset, data, size)

    def _var_location(self, section: str, var: str) -> tuple[int, int]:
        """Offset and size of global `var` in `section`, from the object's BTF DATASEC."""
        btf = _check_ptr(_lib.bpf_object__btf(self._handle), "object BTF")
        sec_id = _lib.btf__find_by_name_kind(btf, section.encode(), _BTF_KIND_DATASEC)
        _check(sec_id, f"BTF datasec {section}")
        sec = _BtfType.from_address(_lib.btf__type_by_id(btf, sec_id))
        vlen = sec.info & 0xFFFF
        infos = (_BtfVarSecinfo * vlen).from_address(
            ctypes.addressof(sec) + ctypes.sizeof(_BtfType)
        )
        for info in infos:
            t = _BtfType.from_address(_lib.btf__type_by_id(btf, info.type))
            if (t.info >> 24) & 0x1F != _BTF_KIND_VAR:
                continue
            if _lib.btf__name_by_offset(btf, t.name_off) == var.encode():
                return info.offset, info.size
        raise LibbpfError(errno_mod.ENOENT, f"{self.path.name}: no global {var!r} in {section}")

    def set_autoload(self, prog_name: str, autoload: bool) -> None:
        """Leave a program out of the load (e.g. a hook this kernel lacks)."""
        self._settings.append(lambda o: o.set_autoload(prog_name, autoload))
        _check(
            _lib.bpf_program__set_autoload(self._prog_ptr(prog_name), autoload),
            f"autoload {prog_name}",
        )

    # -- load and attach

    def load(self, *, explain: bool = True) -> None:
        """Load (relocate, verify) every program. libbpf's log is off during it (silent_log:
        its thousands of lines each cost a trip through the GIL); if the load fails and
        `explain`, a copy is loaded again with the log on, for the lines that say why (a
        probe, which reports only the first line, passes explain=False)."""
        _clear_log()
        with silent_log():
            ret = _lib.bpf_object__load(self._handle)
        if ret < 0:
            log = self._explain_failed_load() if explain else ""
            raise LibbpfError(-ret, f"load {self.path.name}", log)
        self.loaded = True

    def _explain_failed_load(self) -> str:
        """libbpf's log of loading a fresh copy of this object, set up the same way."""
        try:
            with BpfObject(self.path) as copy:
                for setting in self._settings:
                    setting(copy)
                _clear_log()
                _lib.bpf_object__load(copy._handle)
                return _take_log()
        except (LibbpfError, ValueError):
            return _take_log()

    def _prog_ptr(self, name: str) -> int:
        ptr = _lib.bpf_object__find_program_by_name(self._handle, name.encode())
        if not ptr:
            raise LibbpfError(errno_mod.ENOENT, f"{self.path.name}: no program named {name!r}")
        return int(ptr)

    def relocated_programs(self) -> dict[str, bytes]:
        """Each program's instructions as loaded (CO-RE relocated), with the map fds and map
        value addresses of 64-bit immediate loads zeroed: equal for two loads of one object
        exactly when every relocation resolved the same way."""
        out: dict[str, bytes] = {}
        prog = _lib.bpf_object__next_program(self._handle, None)
        while prog:
            count = _lib.bpf_program__insn_cnt(prog)
            raw = bytearray(ctypes.string_at(_lib.bpf_program__insns(prog), count * 8))
            i = 0
            while i < count:
                if raw[8 * i] == _BPF_LD_IMM64:
                    if raw[8 * i + 1] >> 4 in _PSEUDO_MAP_SRC:
                        raw[8 * i + 4 : 8 * i + 8] = bytes(4)
                    i += 2
                else:
                    i += 1
            out[_lib.bpf_program__name(prog).decode()] = bytes(raw)
            prog = _lib.bpf_object__next_program(self._handle, prog)
        return out

    def program_names(self) -> list[str]:
        names: list[str] = []
        prog = _lib.bpf_object__next_program(self._handle, None)
        while prog:
            names.append(_lib.bpf_program__name(prog).decode())
            prog = _lib.bpf_object__next_program(self._handle, prog)
        return names

    def attach(self, prog_name: str) -> None:
        """Attach one program at the point its SEC() names; the link lives until close()."""
        ctypes.set_errno(0)
        link = _check_ptr(
            _lib.bpf_program__attach(self._prog_ptr(prog_name)), f"attach {prog_name}"
        )
        self._links.append(link)
        self._link_names.append(prog_name)

    def attach_all(self, names: Sequence[str] | None = None) -> None:
        """Attach `names` (default: every program), all or nothing."""
        try:
            for name in names if names is not None else self.program_names():
                self.attach(name)
        except BaseException:
            self.detach()
            raise

    def run_iter(self, prog_name: str) -> bytes:
        """Run an attached iterator program once; what it printed (often nothing: it may
        write maps instead)."""
        if prog_name not in self._link_names:
            raise LibbpfError(errno_mod.ENOENT, f"iterator {prog_name} is not attached")
        link = self._links[self._link_names.index(prog_name)]
        fd = _check(_lib.bpf_iter_create(_lib.bpf_link__fd(link)), f"iterate {prog_name}")
        try:
            chunks = []
            while chunk := os.read(fd, 65536):
                chunks.append(chunk)
            return b"".join(chunks)
        finally:
            os.close(fd)

    def detach(self) -> None:
        """Destroy every link (idempotent). The programs stay loaded until close()."""
        while self._links:
            self._link_names.pop()
            # A pinned link only loses this process's fd here: the pin keeps it attached.
            _lib.bpf_link__destroy(self._links.pop())

    # -- pins (bpffs): what outlives this process

    def pin_links(self, directory: str | os.PathLike[str]) -> list[Path]:
        """Pin every attached link as `directory/<program>`: each stays attached, deciding,
        after this process exits, until its pin is removed (unlink)."""
        out = []
        for name, link in zip(self._link_names, self._links, strict=True):
            path = Path(directory) / name
            _check(_lib.bpf_link__pin(link, os.fsencode(path)), f"pin link {name} at {path}")
            out.append(path)
        return out

    def pin_map(self, name: str, path: str | os.PathLike[str]) -> Path:
        """Pin one map at `path` (a file on bpffs); it then outlives this process."""
        _check(_lib.bpf_map__pin(self._map_ptr(name), os.fsencode(path)), f"pin map {name}")
        return Path(path)

    def map(self, name: str) -> BpfMap:
        ptr = self._map_ptr(name)
        fd = _lib.bpf_map__fd(ptr)
        _check(fd, f"map fd {name}")
        return BpfMap(fd, name, _lib.bpf_map__key_size(ptr), _lib.bpf_map__value_size(ptr))

    def close(self) -> None:
        """Detach and free everything (idempotent)."""
        self.detach()
        if self._obj is not None:
            _lib.bpf_object__close(self._obj)
            self._obj = None

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self, t: type[BaseException] | None, v: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

    def __del__(self) -> None:
        # At interpreter shutdown libbpf may be gone already; the kernel frees the fds anyway.
        with contextlib.suppress(Exception):
            self.close()


def open_pinned_map(path: str | os.PathLike[str]) -> BpfMap:
    """A map pinned on bpffs (by this or an earlier process), used by a new fd."""
    fd = _lib.bpf_obj_get(os.fsencode(path))
    if fd < 0:
        raise LibbpfError(-fd, f"open pinned map {path}")
    info = _MapInfo()
    size = ctypes.c_uint32(ctypes.sizeof(info))
    ret = _lib.bpf_obj_get_info_by_fd(fd, ctypes.byref(info), ctypes.byref(size))
    if ret < 0:
        os.close(fd)
        _check(ret, f"map info {path}")
    return BpfMap(fd, info.name.decode(errors="replace"), info.key_size, info.value_size,
                  info.max_entries)


def held_program_ids(pid: int | str = "self") -> set[int]:
    """Ids of the BPF programs a process holds (through prog or link fds), from its fdinfo.
    For tests and benchmarks: "is everything this engine attached gone?"."""
    ids: set[int] = set()
    try:
        infos = list(Path(f"/proc/{pid}/fdinfo").iterdir())
    except OSError:
        return ids
    for info in infos:
        try:
            text = info.read_text()
        except OSError:
            continue
        ids.update(int(ln.split()[1]) for ln in text.splitlines() if ln.startswith("prog_id:"))
    return ids
