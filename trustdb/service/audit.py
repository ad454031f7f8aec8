"""The audit-mode summary: what enforcing would have denied, in the terms a person acts on.

Read from the decision log (JSON lines). Grouped twice: by file (each with how often, which
programs tried, and the `trustdb trust` command), and by program (which untrusted files it
tried to run or map), so "my editor's plugin host maps 12 untrusted .so files" is one line.
"""

from __future__ import annotations

from collections import Counter, defaultdict
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

from trustdb.abi import Verdict
from trustdb.events import Decision


@dataclass(frozen=True, slots=True)
class FileRow:
    path: str
    count: int
    programs: tuple[str, ...]
    hooks: tuple[str, ...]

    def command(self, db: Path | None = None) -> str:
        opt = f" --db {db}" if db is not None else ""
        if self.path.startswith("/"):
            return f"trustdb trust{opt} {self.path}"
        return "(no full path: find the file by its inode and device in `trustdb log`)"


@dataclass
class AuditSummary:
    files: list[FileRow] = field(default_factory=list)
    programs: dict[str, list[str]] = field(default_factory=dict)
    """Program (exe, or comm) -> the untrusted files it exec'd or mapped."""
    total: int = 0

    def lines(self, db: Path | None = None) -> list[str]:
        if not self.total:
            return ["nothing would have been denied"]
        out = [f"{self.total} decision(s) would have been denials, {len(self.files)} file(s):",
               "", "by file:"]
        for f in self.files:
            out.append(f"  {f.path}  x{f.count}  ({', '.join(f.hooks)}; by "
                       f"{', '.join(f.programs)})")
            out.append(f"      {f.command(db)}")
        out += ["", "by program:"]
        for prog, paths in sorted(self.programs.items()):
            out.append(f"  {prog}: {len(paths)} file(s): {', '.join(paths[:5])}"
                       + (" ..." if len(paths) > 5 else ""))
        return out


def summarize(decisions: Iterable[Decision]) -> AuditSummary:
    counts: Counter[str] = Counter()
    progs: dict[str, set[str]] = defaultdict(set)
    hooks: dict[str, set[str]] = defaultdict(set)
    by_prog: dict[str, set[str]] = defaultdict(set)
    total = 0
    for d in decisions:
        if d.verdict == Verdict.ALLOW or not d.path:
            continue
        total += 1
        counts[d.path] += 1
        # An exec's exe is the file itself: the program that matters is the one mapping it.
        program = "(exec)" if d.hook.name == "EXEC" else (d.exe or d.comm)
        progs[d.path].add(program)
        hooks[d.path].add(d.hook.name.lower())
        by_prog[program].add(d.path)
    rows = [FileRow(p, n, tuple(sorted(progs[p])), tuple(sorted(hooks[p])))
            for p, n in counts.most_common()]
    return AuditSummary(rows, {k: sorted(v) for k, v in by_prog.items()}, total)
