"""Ring buffers of loaded objects (BPF_MAP_TYPE_RINGBUF) over libbpf's ring_buffer API; part of
the ctypes wrapper trustdb.libbpf, which re-exports `RingBuffer`."""

from __future__ import annotations

import ctypes
import errno as errno_mod
from collections.abc import Callable
from types import TracebackType
from typing import Self

from trustdb.libbpf_calls import _RB_SAMPLE_FN, LibbpfError, _check, _check_ptr, _lib


class RingBuffer:
    """Reads records from a BPF_MAP_TYPE_RINGBUF map fd; `on_record(bytes)` gets each one.

    Not thread-safe: poll from one thread. An exception in `on_record` stops the current poll
    and is re-raised from poll()/consume().
    """

    def __init__(self, map_fd: int, on_record: Callable[[bytes], None]) -> None:
        self._on_record = on_record
        self._error: BaseException | None = None
        self._cb = _RB_SAMPLE_FN(self._sample)  # must outlive the ring_buffer
        ctypes.set_errno(0)
        self._rb: int | None = _check_ptr(
            _lib.ring_buffer__new(map_fd, self._cb, None, None), "ring_buffer__new"
        )

    def _sample(self, ctx: int | None, data: int, size: int) -> int:
        try:
            self._on_record(ctypes.string_at(data, size))
        except BaseException as e:  # noqa: BLE001 - handed back to the caller of poll()
            self._error = e
            return -1
        return 0

    def _rethrow(self, ret: int, what: str) -> int:
        if self._error is not None:
            err, self._error = self._error, None
            raise err
        if ret == -errno_mod.EINTR:
            return 0
        return _check(ret, what)

    def poll(self, timeout_ms: int) -> int:
        """Wait up to timeout_ms for records; returns how many were handled."""
        return self._rethrow(_lib.ring_buffer__poll(self._handle, timeout_ms), "ring_buffer__poll")

    def consume(self) -> int:
        """Handle every record available now, without waiting."""
        return self._rethrow(_lib.ring_buffer__consume(self._handle), "ring_buffer__consume")

    @property
    def epoll_fd(self) -> int:
        """For select()/asyncio: readable when records are waiting."""
        return int(_lib.ring_buffer__epoll_fd(self._handle))

    @property
    def _handle(self) -> int:
        if self._rb is None:
            raise LibbpfError(errno_mod.EBADF, "ring buffer is closed")
        return self._rb

    def close(self) -> None:
        if self._rb is not None:
            _lib.ring_buffer__free(self._rb)
            self._rb = None

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self, t: type[BaseException] | None, v: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()
