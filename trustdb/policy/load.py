"""Reading policy files: TOML (tomllib), checked strictly. Every error names file:line; an
unknown key is an error (a typo must never silently widen or narrow a policy)."""

from __future__ import annotations

import os
import re
import tomllib
from collections.abc import Iterator, Mapping
from pathlib import Path
from types import MappingProxyType
from typing import Any

from trustdb.policy.model import (
    Enforcement,
    FilesystemRules,
    InterpreterRules,
    NetworkMode,
    NetworkRules,
    Policy,
    ProgramRef,
    ScriptJudgement,
    ServiceRules,
)

DEFAULT_POLICY = "agent"
"""What `trustdb run` uses without --policy."""

_REPO_POLICIES = Path(__file__).resolve().parents[2] / "policies"
_PACKAGE_POLICIES = Path(__file__).resolve().parents[1] / "policies"
"""The shipped policies inside an installed wheel (package data, copied by setup.py)."""


class PolicyError(Exception):
    """A policy could not be found or is invalid: `file:line: message`."""


def search_path() -> list[Path]:
    """Where policy NAMEs are looked up, first match wins: $TRUSTDB_POLICY_DIR, /etc (the
    administrator's), the shipped policies/ folder."""
    dirs = [Path(d) for d in os.environ.get("TRUSTDB_POLICY_DIR", "").split(os.pathsep) if d]
    return [*dirs, Path("/etc/trustdb/policies"), Path("/usr/share/trustdb/policies"),
            _REPO_POLICIES, _PACKAGE_POLICIES]


def available() -> dict[str, Path]:
    """Policy name -> file, for `trustdb policy list`."""
    found: dict[str, Path] = {}
    for d in search_path():
        for f in sorted(d.glob("*.toml")) if d.is_dir() else ():
            found.setdefault(f.stem, f)
    return found


def find(name_or_file: str) -> Path:
    """A NAME from the search path, or a FILE (anything with a `/` or a `.toml` suffix)."""
    if "/" in name_or_file or name_or_file.endswith(".toml"):
        path = Path(name_or_file)
        if not path.is_file():
            raise PolicyError(f"{name_or_file}: no such policy file")
        return path
    found = available().get(name_or_file)
    if found is None:
        names = ", ".join(sorted(available())) or "none"
        raise PolicyError(f"no policy named {name_or_file!r} (available: {names})")
    return found


def load(name_or_file: str = DEFAULT_POLICY) -> Policy:
    return load_file(find(name_or_file))


def load_file(path: Path) -> Policy:
    try:
        text = path.read_text()
    except (OSError, UnicodeDecodeError) as e:
        raise PolicyError(f"{path}: cannot read: {getattr(e, 'strerror', None) or e}") from e
    return parse(text, str(path), default_name=path.stem)


# --- checking ------------------------------------------------------------------------------


class _Locator:
    """Line numbers for keys (tomllib gives values only): `[table]` headers and `key =` lines."""

    _HEADER = re.compile(r"^\s*\[\[?\s*([^\]]+?)\s*\]\]?")
    _KEY = re.compile(r"^\s*(\"[^\"]*\"|'[^']*'|[A-Za-z0-9_.-]+)\s*=")

    def __init__(self, text: str) -> None:
        self.lines: dict[tuple[str, ...], int] = {}
        table: tuple[str, ...] = ()
        for n, line in enumerate(text.splitlines(), 1):
            if m := self._HEADER.match(line):
                table = tuple(self._split(m.group(1)))
                self.lines.setdefault(table, n)
            elif m := self._KEY.match(line):
                self.lines.setdefault((*table, *self._split(m.group(1))), n)

    @staticmethod
    def _split(dotted: str) -> Iterator[str]:
        for part in re.findall(r"\"[^\"]*\"|'[^']*'|[^.]+", dotted):
            yield part.strip().strip("\"'")

    def line(self, keys: tuple[str, ...]) -> int:
        while keys:
            if keys in self.lines:
                return self.lines[keys]
            keys = keys[:-1]
        return 1


class _Checker:
    def __init__(self, text: str, source: str) -> None:
        self.where = _Locator(text)
        self.source = source

    def fail(self, keys: tuple[str, ...], message: str) -> PolicyError:
        return PolicyError(f"{self.source}:{self.where.line(keys)}: {message}")

    def table(self, data: Any, keys: tuple[str, ...], allowed: set[str]) -> Mapping[str, Any]:
        if not isinstance(data, dict):
            raise self.fail(keys, f"[{'.'.join(keys)}] must be a table")
        for k in data:
            if k not in allowed:
                raise self.fail((*keys, k), f"unknown key {'.'.join((*keys, k))!r} "
                                f"(known: {', '.join(sorted(allowed))})")
        return data

    def strings(self, data: Mapping[str, Any], keys: tuple[str, ...]) -> tuple[str, ...]:
        value = data.get(keys[-1], [])
        if not isinstance(value, list) or not all(isinstance(v, str) and v for v in value):
            raise self.fail(keys, f"{'.'.join(keys)} must be a list of non-empty strings")
        return tuple(value)

    def ports(self, data: Mapping[str, Any], keys: tuple[str, ...]) -> tuple[int, ...]:
        value = data.get(keys[-1], [])
        if not isinstance(value, list) or not all(
                isinstance(v, int) and not isinstance(v, bool) and 0 < v < 65536 for v in value):
            raise self.fail(keys, f"{'.'.join(keys)} must be a list of TCP ports (1-65535)")
        return tuple(value)

    def boolean(self, data: Mapping[str, Any], keys: tuple[str, ...], default: bool) -> bool:
        value = data.get(keys[-1], default)
        if not isinstance(value, bool):
            raise self.fail(keys, f"{'.'.join(keys)} must be true or false")
        return value

    def choice(self, data: Mapping[str, Any], keys: tuple[str, ...], enum: Any, default: Any) -> Any:
        value = data.get(keys[-1], default.value)
        try:
            return enum(value)
        except ValueError:
            words = " or ".join(repr(e.value) for e in enum)
            raise self.fail(keys, f"{'.'.join(keys)} must be {words}, not {value!r}") from None

    def programs(self, data: Mapping[str, Any], keys: tuple[str, ...]) -> tuple[ProgramRef, ...]:
        refs = []
        for item in self.strings(data, keys):
            if item.startswith("blake3:"):
                digest = item.removeprefix("blake3:").lower()
                if not re.fullmatch(r"[0-9a-f]{64}", digest):
                    raise self.fail(keys, f"{item!r}: a digest is blake3: and 64 hex digits")
                refs.append(ProgramRef(digest=digest))
            elif item.startswith(("/", "~", "$")):
                refs.append(ProgramRef(path=item))
            else:
                raise self.fail(keys, f"{item!r}: name a program by absolute path or blake3:HEX")
        return tuple(refs)

    def paths(self, data: Mapping[str, Any], keys: tuple[str, ...]) -> tuple[str, ...]:
        items = self.strings(data, keys)
        for item in items:
            if not item.startswith(("/", "~", "$")):
                raise self.fail(keys, f"{item!r}: paths start with /, ~ or a $VARIABLE")
            var = re.match(r"\$\{?([A-Z_]+)", item)
            if var and var.group(1) not in PATH_VARIABLES:
                raise self.fail(keys, f"{item!r}: unknown variable ${var.group(1)} "
                                f"(known: {', '.join('$' + v for v in PATH_VARIABLES)})")
        return items


PATH_VARIABLES = ("WORKDIR", "HOME", "TMPDIR")


def parse(text: str, source: str = "<policy>", default_name: str = "policy") -> Policy:
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        m = re.search(r"at line (\d+)", str(e))
        raise PolicyError(f"{source}:{m.group(1) if m else 1}: {e}") from e
    c = _Checker(text, source)
    top = c.table(data, (), {"policy", "filesystem", "network", "jit", "interpreters",
                             "compilers", "service"})
    head = c.table(top.get("policy", {}), ("policy",), {"name", "description", "mode"})
    name = head.get("name", default_name)
    description = head.get("description", "")
    for key, value in (("name", name), ("description", description)):
        if not isinstance(value, str):
            raise c.fail(("policy", key), f"policy.{key} must be a string")
    fs = c.table(top.get("filesystem", {}), ("filesystem",),
                 {"read_write", "read_only", "no_access", "private_tmp", "protected"})
    net = c.table(top.get("network", {}), ("network",),
                  {"mode", "connect_tcp", "bind_tcp", "udp"})
    network = NetworkRules(
        mode=c.choice(net, ("network", "mode"), NetworkMode, NetworkMode.NONE),
        connect_tcp=c.ports(net, ("network", "connect_tcp")),
        bind_tcp=c.ports(net, ("network", "bind_tcp")),
        udp=c.boolean(net, ("network", "udp"), False),
    )
    if network.mode != NetworkMode.PORTS and (network.connect_tcp or network.bind_tcp):
        raise c.fail(("network", "mode"), "ports are listed but network.mode is not \"ports\"")
    jit = c.table(top.get("jit", {}), ("jit",), {"programs"})
    interp = c.table(top.get("interpreters", {}), ("interpreters",),
                     {"programs", "scripts", "deny_inline", "read_sources"})
    compilers = c.table(top.get("compilers", {}), ("compilers",), {"trust_outputs"})
    return Policy(
        name=name,
        description=description,
        source=source,
        mode=c.choice(head, ("policy", "mode"), Enforcement, Enforcement.ENFORCE),
        filesystem=FilesystemRules(
            read_write=c.paths(fs, ("filesystem", "read_write")),
            read_only=c.paths(fs, ("filesystem", "read_only")),
            no_access=c.paths(fs, ("filesystem", "no_access")),
            private_tmp=c.boolean(fs, ("filesystem", "private_tmp"), True),
            protected=c.strings(fs, ("filesystem", "protected")),
        ),
        network=network,
        jit=c.programs(jit, ("jit", "programs")),
        interpreters=InterpreterRules(
            programs=c.programs(interp, ("interpreters", "programs")),
            scripts=c.choice(interp, ("interpreters", "scripts"), ScriptJudgement,
                             ScriptJudgement.TRUSTED),
            deny_inline=c.strings(interp, ("interpreters", "deny_inline")),
            read_sources=c.strings(interp, ("interpreters", "read_sources")),
        ),
        trust_compiler_outputs=c.boolean(compilers, ("compilers", "trust_outputs"), False),
        service=_service(c, top.get("service", {})),
    )


def _service(c: _Checker, data: Any) -> ServiceRules:
    svc = c.table(data, ("service",), {"mode", "uids", "cgroups"})
    uids: dict[int, Enforcement] = {}
    for uid, mode in c.table(svc.get("uids", {}), ("service", "uids"), set(svc.get("uids", {}))).items():
        if not str(uid).isdigit():
            raise c.fail(("service", "uids", uid), f"service.uids: {uid!r} is not a numeric uid")
        uids[int(uid)] = c.choice({uid: mode}, ("service", "uids", uid), Enforcement,
                                  Enforcement.ENFORCE)
    cgroups: dict[str, Enforcement] = {}
    for cg, mode in c.table(svc.get("cgroups", {}), ("service", "cgroups"),
                            set(svc.get("cgroups", {}))).items():
        if not cg.startswith("/"):
            raise c.fail(("service", "cgroups", cg), f"service.cgroups: {cg!r} must start with /")
        cgroups[cg] = c.choice({cg: mode}, ("service", "cgroups", cg), Enforcement,
                               Enforcement.ENFORCE)
    return ServiceRules(
        mode=c.choice(svc, ("service", "mode"), Enforcement, Enforcement.ENFORCE),
        per_uid=MappingProxyType(uids),
        per_cgroup=MappingProxyType(cgroups),
    )
