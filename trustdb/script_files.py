"""Which opens of a confined interpreter load its code files (the first-seen handler asks at
each open): what its command line and environment name (`trustdb.script_args`), looked at
afresh each time.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass

from trustdb.script_args import ScriptPlan, resolve_in_tree, script_plan


def _writable_in_tree(pid: int, path: str) -> tuple[int, int] | None:
    return resolve_in_tree(pid, path, writable_only=True)


@dataclass
class ScriptFiles:
    """Which opens of a confined interpreter load its code files. The *plan* (what its command
    line and environment name) is cached per process and command line (an exec changes it);
    the files it names are looked at afresh at each open, never cached: a name can be created,
    replaced or swapped (renameat2 RENAME_EXCHANGE) between two opens, and between the
    interpreter's open and our look. So an open is code when its file *is* a planned file now,
    or when the path the interpreter passed to the open syscall it is blocked in is a planned
    name (whatever file that name reached)."""

    resolve: Callable[[int, str], tuple[int, int] | None] = resolve_in_tree
    resolve_writable: Callable[[int, str], tuple[int, int] | None] = _writable_in_tree
    open_paths: Callable[[int], list[bytes] | None] | None = None
    """tgid -> the paths its threads are opening now (trustdb.write_opens.opening_paths)."""
    limit: int = 1024
    _plans: dict[int, tuple[bytes, ScriptPlan]] | None = None

    def plan(self, pid: int, name: str, at: int = 0) -> ScriptPlan | None:
        """The plan of task `pid`, interpreter `name` whose argv starts at cmdline[at] (after
        ld.so's), or None if its /proc files cannot be read."""
        if self._plans is None:
            self._plans = {}
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                cmdline = f.read()
            with open(f"/proc/{pid}/environ", "rb") as f:
                environ = f.read()
        except OSError:
            return None
        stamp = b"\1".join((name.encode(), str(at).encode(), cmdline, environ))
        hit = self._plans.get(pid)
        if hit is not None and hit[0] == stamp:
            return hit[1]
        argv = [a.decode(errors="surrogateescape") for a in cmdline.split(b"\0")[:-1]][at:]
        env = dict(e.decode(errors="surrogateescape").partition("=")[::2]
                   for e in environ.split(b"\0")[:-1])
        plan = script_plan(argv, env, name)
        if len(self._plans) >= self.limit:
            del self._plans[next(iter(self._plans))]
        self._plans[pid] = (stamp, plan)
        return plan

    def of(self, pid: int, name: str, at: int = 0) -> frozenset[tuple[int, int]]:
        """(dev, ino) of the files task `pid`'s plan names, resolved now."""
        plan = self.plan(pid, name, at)
        if plan is None:
            return frozenset()
        found = [self.resolve(pid, p) for p in plan.files]
        found += [self.resolve_writable(pid, p) for p in plan.rc_files]
        return frozenset(i for i in found if i)

    def is_code(self, pid: int, name: str, identity: tuple[int, int], at: int = 0) -> bool:
        """Whether task `pid`'s open of the file `identity` loads one of its planned files.
        In doubt (its /proc files unreadable) it does."""
        plan = self.plan(pid, name, at)
        if plan is None:
            return True
        if not plan.files and not plan.rc_files:
            return False
        if self.open_paths is not None:
            opening = self.open_paths(pid)
            if opening is None:
                return True
            if any(not p or names_planned(p, plan.files) for p in opening):  # b'': unreadable
                return True
        return identity in self.of(pid, name, at)


def names_planned(opened: bytes, planned: tuple[str, ...]) -> bool:
    """Whether the path an open was given names one of the planned files: the same string, or
    an absolute path ending in a planned relative one (python opens `x` as `$PWD/x`)."""
    got = os.path.normpath(os.fsdecode(opened)) if opened else ""
    for p in planned:
        want = os.path.normpath(p)
        if got == want or (not want.startswith("/") and got.endswith("/" + want)):
            return True
    return False


__all__ = ["ScriptFiles", "names_planned"]
