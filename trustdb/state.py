"""What is running, for `trustdb status` and `trustdb backends`: one JSON file per running
engine, and the backend table probed on this kernel."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

STATE_DIR = Path(os.environ.get("TRUSTDB_RUN_DIR", "/run/trustdb"))
"""One JSON file per running engine (`<pid>.json`), removed when it stops; a file whose pid is
gone is stale (the process was killed) and is ignored and removed."""


@dataclass(frozen=True, slots=True)
class EngineState:
    pid: int
    kind: str
    """`run` or `daemon`."""
    backend: str
    mode: str
    scope: str
    """The cgroup path, or `system-wide`."""
    command: str = ""
    confinement: str = ""
    """`run`: what confines the tree's filesystem and network (Landlock ABI N or the mount
    fallback, the network rules, seccomp's socket rule), as its first stderr line says."""
    modes: tuple[str, ...] = ()
    """`daemon`: the per-uid and per-cgroup modes in force (trustdb.service.modes)."""

    def to_dict(self) -> dict[str, object]:
        return {"pid": self.pid, "kind": self.kind, "backend": self.backend,
                "mode": self.mode, "scope": self.scope, "command": self.command,
                "confinement": self.confinement, "modes": list(self.modes)}


def _state_path(pid: int) -> Path:
    return STATE_DIR / f"{pid}.json"


def publish_state(state: EngineState) -> None:
    import json

    try:
        STATE_DIR.mkdir(mode=0o755, parents=True, exist_ok=True)
        tmp = STATE_DIR / f".{state.pid}.tmp"
        tmp.write_text(json.dumps(state.to_dict()))
        tmp.replace(_state_path(state.pid))
    except OSError:
        pass  # status is a convenience; never fail a run for it


def withdraw_state(pid: int) -> None:
    try:
        _state_path(pid).unlink()
    except OSError:
        pass


def running_engines() -> list[EngineState]:
    import json

    found = []
    for p in sorted(STATE_DIR.glob("*.json")):
        try:
            d = json.loads(p.read_text())
            d["modes"] = tuple(d.get("modes", ()))
            state = EngineState(**d)
        except (OSError, ValueError, TypeError):
            continue
        if Path(f"/proc/{state.pid}").exists():
            found.append(state)
        else:
            withdraw_state(state.pid)
    return found


def describe(s: EngineState) -> str:
    scope = s.scope if s.kind == "daemon" else f"cgroup {s.scope}: {s.command}"
    confinement = f" ({s.confinement})" if s.confinement else ""
    modes = f"; modes: {', '.join(s.modes)}" if s.modes else ""
    return f"{s.mode} with the {s.backend} backend, {scope}{confinement}{modes}"


@dataclass(frozen=True, slots=True)
class BackendRow:
    name: str
    ok: bool
    reason: str
    selected: bool
    guarantees: str = ""
    holes: tuple[str, ...] = ()

    def to_dict(self) -> dict[str, object]:
        return {"name": self.name, "ok": self.ok, "reason": self.reason,
                "selected": self.selected, "guarantees": self.guarantees,
                "holes": list(self.holes)}


def probe_backends(*, remembered: bool = False) -> list[BackendRow]:
    """Every compiled-in backend, strongest first, probed on this kernel (afresh, and the
    answers remembered for `run`: trustdb.probecache; with `remembered`, this boot's remembered
    answers where there are: `trustdb status`); the first that works is the one `run` and
    `daemon` pick by default."""
    from trustdb import backends

    probe_of = backends.remembered_or_probe if remembered else backends.probe_and_remember
    rows = []
    chosen = False
    for cls in sorted(backends.COMPILED, key=lambda b: -b.strength):
        probe = probe_of(cls())
        rows.append(BackendRow(cls.name, probe.ok, probe.reason, probe.ok and not chosen,
                               getattr(cls, "guarantees", ""), tuple(cls.holes)))
        chosen = chosen or probe.ok
    return rows
