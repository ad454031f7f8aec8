"""`deny_inline`: refusing inline code (`python3 -c`, `bash -c`, `perl -e`, code on stdin) for
the interpreters a policy names, where the backend sees their arguments.

The command line of an exec is final only once the new program runs: at the exec permission
event /proc/PID/cmdline still shows the old program's. The first thing a dynamically linked
interpreter does after exec is open its C library (ld.so, before any of its own code runs);
with deny_inline set the first-seen handler keeps asking about opens of `libc.so.*`, and when
the opener is a listed interpreter whose command line (read as that interpreter reads it,
`trustdb.script_args`) asks for inline code, that open is refused: ld.so stops with EPERM
before the interpreter's first instruction. `ld.so /usr/bin/python3 -c ...` is read through
ld.so's own options to the program it runs.

Out of reach (named in `trustdb backends`): a statically linked interpreter (it opens no
library), and inline code fed in after start (an interactive session, `eval` inside a script).
"""

from __future__ import annotations

import fnmatch
import os
from collections.abc import Callable, Sequence

from trustdb.script_args import read_nul_list, resolve_fd, script_plan

LD_SO_VALUE_OPTIONS = frozenset({"--library-path", "--inhibit-rpath", "--audit", "--preload",
                                 "--argv0", "--glibc-hwcaps-prepend", "--glibc-hwcaps-mask"})


def is_libc(path: str) -> bool:
    """A C library every dynamically linked glibc program opens right after exec."""
    return os.path.basename(path).startswith("libc.so")


def is_ld_so(name: str) -> bool:
    return name.startswith(("ld-linux", "ld.so", "ld64.so"))


def listed(name: str, deny: Sequence[str]) -> bool:
    """`python3` lists python3.11 too; globs are allowed."""
    return any(fnmatch.fnmatchcase(name, d) or fnmatch.fnmatchcase(name, d + "*") for d in deny)


def ld_so_program(argv: list[str]) -> int:
    """Index in ld.so's argv of the program it runs (0 if none)."""
    i = 1
    while i < len(argv):
        arg = argv[i]
        if arg == "--":
            return i + 1 if i + 1 < len(argv) else 0
        if arg in LD_SO_VALUE_OPTIONS:
            i += 2
            continue
        if arg.startswith("--"):
            i += 1
            continue
        return i
    return 0


InterpreterOf = Callable[[os.stat_result, str], "str | None"]
"""(stat of a program file, its current basename) -> its interpreter name, or None."""


def interpreter_program(pid: int, interpreter_of: InterpreterOf) -> tuple[str, int] | None:
    """(interpreter name, index in task `pid`'s cmdline where that interpreter's own argv
    starts) if `pid` runs an interpreter: its exe, or the program ld.so runs
    (`ld.so /usr/bin/python3 ./evil`: /proc/PID/exe is ld.so)."""
    try:
        st = os.stat(f"/proc/{pid}/exe")  # stat, never open (that would ask the handler)
        exe = os.path.basename(os.readlink(f"/proc/{pid}/exe"))
    except OSError:
        return None
    name = interpreter_of(st, exe)
    if name is not None:
        return name, 0
    if not is_ld_so(exe):
        return None
    try:
        argv = read_nul_list(f"/proc/{pid}/cmdline")
    except OSError:
        return None
    at = ld_so_program(argv)
    program = resolve_fd(pid, argv[at]) if at else None
    if program is None:
        return None
    try:
        pst = os.fstat(program)
    finally:
        os.close(program)
    name = interpreter_of(pst, os.path.basename(argv[at]))
    return (name, at) if name is not None else None


def inline_refusal(pid: int, deny: Sequence[str], interpreter_of: InterpreterOf) -> str:
    """Why task `pid` must not run (e.g. `python3.11: inline code (-c)`), or ''."""
    program = interpreter_program(pid, interpreter_of)
    if program is None or not listed(program[0], deny):
        return ""
    name, at = program
    try:
        argv = read_nul_list(f"/proc/{pid}/cmdline")[at:]
        env = dict(e.partition("=")[::2] for e in read_nul_list(f"/proc/{pid}/environ"))
    except OSError:
        return ""
    inline = script_plan(argv, env, name).inline
    return f"{name}: {inline}" if inline else ""
