"""A pseudo-terminal between the confined tree and the user's terminal, relayed by the
supervisor (as `script` and `ssh -t` do).

The tree never holds an fd of the user's terminal: whatever it does to its own terminal (TIOCSTI,
which seccomp denies anyway, job control, escape sequences that answer back) lands in a pty that
dies with the run. The user's terminal is put in raw mode while the relay runs, so keys such as
Ctrl-C reach the tree's line discipline and act on the tree, and restored afterwards.
"""

from __future__ import annotations

import errno
import fcntl
import os
import signal
import termios
import tty
from dataclasses import dataclass, field
from types import FrameType

STD_FDS = (0, 1, 2)


@dataclass
class TerminalRelay:
    """The master side (kept by the supervisor) and the slave side (given to the child)."""

    master: int
    slave: int
    replaced: tuple[int, ...]
    """Which of stdin/stdout/stderr were terminals: the child gets the pty in their place."""
    out: int
    """Where the tree's terminal output goes (the first of stdout, stderr that is a terminal)."""
    _saved: list | None = None  # type: ignore[type-arg]
    _pending: bytearray = field(default_factory=bytearray)
    _old_winch: object = None

    @classmethod
    def open_if_terminal(cls) -> TerminalRelay | None:
        """A relay when any of stdin, stdout, stderr is a terminal, else None (pipes and files
        pass through as they are: the tree gets no controlling terminal at all). Keys are
        relayed only when stdin is the terminal: a tree given the terminal on stdout alone must
        not read what the user types there."""
        replaced = tuple(fd for fd in STD_FDS if os.isatty(fd))
        if not replaced:
            return None
        out = next((fd for fd in (1, 2) if fd in replaced), replaced[0])
        master, slave = os.openpty()
        os.set_inheritable(slave, False)
        os.set_blocking(master, False)
        try:
            termios.tcsetattr(slave, termios.TCSANOW, termios.tcgetattr(replaced[0]))
        except termios.error:
            pass
        relay = cls(master=master, slave=slave, replaced=replaced, out=out)
        relay._copy_window_size()
        return relay

    @property
    def _keys(self) -> bool:
        return 0 in self.replaced

    def start(self) -> None:
        """After the child is forked: drop our slave fd, make the user's terminal raw (only
        when it is our stdin: the keys go to the tree's line discipline)."""
        os.close(self.slave)
        self.slave = -1
        if self._keys:
            self._saved = termios.tcgetattr(0)
            tty.setraw(0, termios.TCSANOW)
        self._old_winch = signal.signal(signal.SIGWINCH, self._on_winch)

    def _on_winch(self, sig: int, frame: FrameType | None) -> None:
        self._copy_window_size()

    def _copy_window_size(self) -> None:
        try:
            size = fcntl.ioctl(self.replaced[0], termios.TIOCGWINSZ, b"\0" * 8)
            fcntl.ioctl(self.master, termios.TIOCSWINSZ, size)
        except OSError:
            pass

    def fds(self) -> tuple[int, ...]:
        """Poll these for input: the user's keys (0, if a terminal) and the tree's output."""
        return (0, self.master) if self._keys else (self.master,)

    def on_ready(self, fd: int) -> None:
        if fd == self.master:
            self.drain()
        elif fd == 0:
            try:
                data = os.read(0, 4096)
            except OSError:
                data = b""
            self._pending += data
        self._flush_input()

    def _flush_input(self) -> None:
        # Never block the supervisor on a tree that reads no input: keep what does not fit.
        while self._pending:
            try:
                n = os.write(self.master, self._pending)
            except BlockingIOError:
                return
            except OSError:
                self._pending.clear()
                return
            del self._pending[:n]

    def drain(self) -> None:
        """Copy everything the tree wrote so far to the user's terminal."""
        while True:
            try:
                data = os.read(self.master, 65536)
            except BlockingIOError:
                return
            except OSError as e:  # EIO: every slave fd is closed (the tree is gone)
                if e.errno == errno.EIO:
                    return
                raise
            if not data:
                return
            view = memoryview(data)
            while view:
                try:
                    view = view[os.write(self.out, view):]
                except BlockingIOError:
                    continue

    def close(self) -> None:
        """Restore the user's terminal exactly as it was."""
        if self.slave >= 0:
            os.close(self.slave)
            self.slave = -1
        if self._saved is not None:
            termios.tcsetattr(0, termios.TCSAFLUSH, self._saved)
            self._saved = None
        if self._old_winch is not None:
            signal.signal(signal.SIGWINCH, self._old_winch)  # type: ignore[arg-type]
            self._old_winch = None
        if self.master >= 0:
            os.close(self.master)
            self.master = -1
