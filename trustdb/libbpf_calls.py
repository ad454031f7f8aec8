"""The ctypes layer under trustdb.libbpf: loading libbpf.so.1, the prototypes of every function
trustdb calls, libbpf's log, and the checks that turn a failed call into `LibbpfError`. Nothing
else imports ctypes for libbpf; trustdb.libbpf builds maps, objects and ring buffers on it.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno as errno_mod
import os
import threading
from collections import deque
from collections.abc import Iterator

BPF_ANY = 0
BPF_NOEXIST = 1
BPF_EXIST = 2


class LibbpfError(OSError):
    """A libbpf call failed. `errno` is set; `log` holds libbpf's recent messages."""

    def __init__(self, err: int, what: str, log: str = "") -> None:
        msg = f"{what}: {os.strerror(err)}"
        if log:
            msg += "\n" + log
        super().__init__(err, msg)
        self.log = log
        self.done = 0
        """For a batch call: how many elements it completed before it failed."""

    def __str__(self) -> str:
        return str(self.args[1])


# ---- the library and its log --------------------------------------------------------------

try:
    _lib = ctypes.CDLL("libbpf.so.1", use_errno=True)
except OSError as e:
    raise ImportError(
        "libbpf.so.1 is not installed (Debian/Ubuntu: apt install libbpf1; Fedora: dnf install "
        "libbpf)",
        name="libbpf.so.1",
    ) from e
_libc = ctypes.CDLL(None, use_errno=True)
_libc.vsnprintf.argtypes = [ctypes.c_char_p, ctypes.c_size_t, ctypes.c_char_p, ctypes.c_void_p]

# libbpf_print_fn_t: int (*)(enum libbpf_print_level, const char *fmt, va_list ap). On x86_64
# a va_list argument is a pointer, so vsnprintf can format it here.
_PRINT_FN = ctypes.CFUNCTYPE(ctypes.c_int, ctypes.c_int, ctypes.c_char_p, ctypes.c_void_p)
_log_lines: deque[str] = deque(maxlen=60)
_log_lock = threading.Lock()


_print_buf = ctypes.create_string_buffer(1 << 20)
"""One buffer for every message, used under _log_lock: a load prints about 2,300 lines, and a
fresh zeroed 1 MiB buffer per line cost 50 ms of `trustdb run`'s start-up (profiled)."""


_LIBBPF_DEBUG = 2
"""enum libbpf_print_level: WARN 0, INFO 1, DEBUG 2. A load prints ~3,600 DEBUG lines (its
progress, never why it failed: that, the verifier log included, is WARN); formatting them cost
about 20 ms of CPU per `trustdb run` (bench/run_startup.py)."""


def _on_print(level: int, fmt: bytes, ap: int) -> int:
    if level >= _LIBBPF_DEBUG:
        return 0
    # One call can carry the whole verifier log; its last lines say what went wrong.
    with _log_lock:
        n = _libc.vsnprintf(_print_buf, len(_print_buf), fmt, ap)
        text = ctypes.string_at(_print_buf, max(0, min(n, len(_print_buf) - 1)))
        _log_lines.extend(text.decode(errors="replace").splitlines())
    return 0


_print_cb = _PRINT_FN(_on_print)  # kept referenced for the life of the process
_lib.libbpf_set_print.argtypes = [_PRINT_FN]
_lib.libbpf_set_print.restype = ctypes.c_void_p
_lib.libbpf_set_print(_print_cb)

_silent_print = ctypes.cast(_libc.abs, _PRINT_FN)
"""A C print function that ignores what it is given (libc's abs(level): pure; the extra
arguments are harmless in the C calling convention). Never NULL: libbpf 1.1 tests the
function pointer and then calls it, so swapping it to NULL while another thread prints could
call NULL; swapping between two functions cannot."""
_silent_depth = 0
_silent_lock = threading.Lock()


@contextlib.contextmanager
def silent_log() -> Iterator[None]:
    """libbpf prints through a C function, not `_on_print`, inside this block (any thread).

    Why: a load prints ~2,800 lines, and each one into `_on_print` is a ctypes callback that
    must take the GIL. `trustdb run` loads on a thread while its main thread runs Python, so
    the load waited for the GIL thousands of times (up to the 5 ms switch interval each):
    the verifier's thread stalled behind the main thread instead of running beside it. A
    failed silent load has no log: `BpfObject.load` loads a copy again with the log on."""
    global _silent_depth
    with _silent_lock:
        _silent_depth += 1
        if _silent_depth == 1:
            _lib.libbpf_set_print(_silent_print)
    try:
        yield
    finally:
        with _silent_lock:
            _silent_depth -= 1
            if _silent_depth == 0:
                _lib.libbpf_set_print(_print_cb)


def _take_log() -> str:
    with _log_lock:
        lines = list(_log_lines)
        _log_lines.clear()
    # The verifier dump can be long; its last lines say what went wrong.
    return "\n".join(lines[-25:])


def _clear_log() -> None:
    with _log_lock:
        _log_lines.clear()


def _check(ret: int, what: str) -> int:
    """libbpf 1.x int APIs return -errno."""
    if ret < 0:
        raise LibbpfError(-ret, what, _take_log())
    return ret


def _check_ptr(ptr: int | None, what: str) -> int:
    """libbpf 1.x pointer APIs return NULL and set errno."""
    if not ptr:
        err = ctypes.get_errno() or errno_mod.EINVAL
        raise LibbpfError(err, what, _take_log())
    return ptr


def _fn(name: str, restype: type | None, *argtypes: type) -> None:
    f = getattr(_lib, name)
    f.restype = restype
    f.argtypes = list(argtypes)


class OpenOpts(ctypes.Structure):
    """struct bpf_object_open_opts (libbpf 1.1), up to the last field it knows."""

    _fields_ = [
        ("sz", ctypes.c_size_t),
        ("object_name", ctypes.c_char_p),
        ("relaxed_maps", ctypes.c_bool),
        ("pin_root_path", ctypes.c_char_p),
        ("_attach_prog_fd", ctypes.c_uint32),  # removed in 1.0: a stub
        ("kconfig", ctypes.c_char_p),
        ("btf_custom_path", ctypes.c_char_p),
        ("kernel_log_buf", ctypes.c_char_p),
        ("kernel_log_size", ctypes.c_size_t),
        ("kernel_log_level", ctypes.c_uint32),
    ]


_p = ctypes.c_void_p
_fn("bpf_object__open_file", _p, ctypes.c_char_p, _p)
_fn("bpf_program__insns", _p, _p)
_fn("bpf_program__insn_cnt", ctypes.c_size_t, _p)
_fn("bpf_object__load", ctypes.c_int, _p)
_fn("bpf_object__close", None, _p)
_fn("bpf_object__btf", _p, _p)
_fn("bpf_object__find_map_by_name", _p, _p, ctypes.c_char_p)
_fn("bpf_object__find_program_by_name", _p, _p, ctypes.c_char_p)
_fn("bpf_object__next_program", _p, _p, _p)
_fn("bpf_object__next_map", _p, _p, _p)
_fn("bpf_program__name", ctypes.c_char_p, _p)
_fn("bpf_program__attach", _p, _p)
_fn("bpf_program__set_autoload", ctypes.c_int, _p, ctypes.c_bool)
_fn("bpf_program__fd", ctypes.c_int, _p)
_fn("bpf_link__destroy", ctypes.c_int, _p)
_fn("bpf_link__fd", ctypes.c_int, _p)
_fn("bpf_iter_create", ctypes.c_int, ctypes.c_int)
_fn("bpf_map__name", ctypes.c_char_p, _p)
_fn("bpf_map__fd", ctypes.c_int, _p)
_fn("bpf_map__set_max_entries", ctypes.c_int, _p, ctypes.c_uint32)
_fn("bpf_map__max_entries", ctypes.c_uint32, _p)
_fn("bpf_map__key_size", ctypes.c_uint32, _p)
_fn("bpf_map__value_size", ctypes.c_uint32, _p)
_fn("bpf_map__initial_value", _p, _p, ctypes.POINTER(ctypes.c_size_t))
_fn("btf__find_by_name_kind", ctypes.c_int, _p, ctypes.c_char_p, ctypes.c_uint32)
_fn("btf__type_by_id", _p, _p, ctypes.c_uint32)
_fn("btf__name_by_offset", ctypes.c_char_p, _p, ctypes.c_uint32)
_fn("bpf_map_update_elem", ctypes.c_int, ctypes.c_int, _p, _p, ctypes.c_uint64)
_fn("bpf_map_lookup_elem", ctypes.c_int, ctypes.c_int, _p, _p)
_fn("bpf_map_delete_elem", ctypes.c_int, ctypes.c_int, _p)
_fn("bpf_map_get_next_key", ctypes.c_int, ctypes.c_int, _p, _p)
_fn("bpf_map_update_batch", ctypes.c_int, ctypes.c_int, _p, _p, ctypes.POINTER(ctypes.c_uint32), _p)
_fn("bpf_link__pin", ctypes.c_int, _p, ctypes.c_char_p)
_fn("bpf_map__pin", ctypes.c_int, _p, ctypes.c_char_p)
_fn("bpf_obj_get", ctypes.c_int, ctypes.c_char_p)
_fn("bpf_obj_get_info_by_fd", ctypes.c_int, ctypes.c_int, _p, ctypes.POINTER(ctypes.c_uint32))
_fn("bpf_map_delete_batch", ctypes.c_int, ctypes.c_int, _p, ctypes.POINTER(ctypes.c_uint32), _p)
_fn("bpf_map_lookup_batch", ctypes.c_int, ctypes.c_int, _p, _p, _p, _p,
    ctypes.POINTER(ctypes.c_uint32), _p)
_RB_SAMPLE_FN = ctypes.CFUNCTYPE(ctypes.c_int, _p, _p, ctypes.c_size_t)
_fn("ring_buffer__new", _p, ctypes.c_int, _RB_SAMPLE_FN, _p, _p)
_fn("ring_buffer__poll", ctypes.c_int, _p, ctypes.c_int)
_fn("ring_buffer__consume", ctypes.c_int, _p)
_fn("ring_buffer__epoll_fd", ctypes.c_int, _p)
_fn("ring_buffer__free", None, _p)


__all__ = ["BPF_ANY", "BPF_EXIST", "BPF_NOEXIST", "LibbpfError", "OpenOpts", "silent_log"]
