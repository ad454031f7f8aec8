"""What a policy says, as values: frozen dataclasses, no I/O (trustdb.policy.load reads files).

One policy is the single home of every choice `trustdb run`, the engine and the service make:
which paths the confined tree may read, write or not see at all, which TCP ports it may use,
which trusted programs may have anonymous executable memory (JITs), which programs are
interpreters and how their scripts are judged, whether compiler outputs are trusted, and whether
denials are enforced or only reported.
"""

from __future__ import annotations

import enum
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from types import MappingProxyType


class Enforcement(enum.Enum):
    ENFORCE = "enforce"
    """Deny what the policy does not allow."""
    AUDIT = "audit"
    """Report and log what would be denied; deny nothing."""


class NetworkMode(enum.Enum):
    NONE = "none"
    """No TCP connect or bind at all."""
    PORTS = "ports"
    """TCP connect/bind only to the ports listed (Landlock ABI 4+)."""
    ALL = "all"
    """The network is not restricted."""


class ScriptJudgement(enum.Enum):
    TRUSTED = "trusted"
    """An interpreter may load a script file only if its content is trusted."""
    ANY = "any"
    """Scripts are not judged (only native code is)."""


@dataclass(frozen=True)
class ProgramRef:
    """A program named by trusted path (its current content must be trusted) or by digest."""

    path: str | None = None
    """Absolute path, `~`, or a $VARIABLE path; the file's content at run start counts."""
    digest: str | None = None
    """`blake3:HEX`: this content wherever it lives."""

    def __str__(self) -> str:
        return self.path if self.path is not None else f"blake3:{self.digest}"


@dataclass(frozen=True)
class FilesystemRules:
    """Paths may use `~` (the invoking user's home), $WORKDIR, $HOME and globs (`*`, `?`, `[]`).
    Anything not listed is not reachable at all (Landlock) or read-only (mount fallback)."""

    read_write: tuple[str, ...] = ()
    read_only: tuple[str, ...] = ()
    no_access: tuple[str, ...] = ()
    """Hidden even where a read rule would reach them (an empty cover is mounted on each)."""
    private_tmp: bool = True
    """A fresh, empty /tmp and /var/tmp for the tree, gone when the run ends."""
    protected: tuple[str, ...] = ()
    """Read-only even inside a read-write grant: names relative to each grant (`.git/config`,
    `.git/hooks`), or `~` paths (shell rc files): what the user's own tools run later, outside
    the tree."""


@dataclass(frozen=True)
class NetworkRules:
    mode: NetworkMode = NetworkMode.NONE
    connect_tcp: tuple[int, ...] = ()
    bind_tcp: tuple[int, ...] = ()
    udp: bool = False
    """UDP, which Landlock does not cover. Unless mode = "all", seccomp refuses every IP socket
    but TCP (and UDP when this is true): UDP, ICMP, SCTP, raw. DNS then goes over TCP port 53
    (the tree's resolv.conf says `options use-vc`)."""


@dataclass(frozen=True)
class InterpreterRules:
    programs: tuple[ProgramRef, ...] = ()
    scripts: ScriptJudgement = ScriptJudgement.TRUSTED
    deny_inline: tuple[str, ...] = ()
    """Interpreter names (basenames) whose inline code (`-c`, `-e`) is refused where the
    backend sees the arguments."""
    read_sources: tuple[str, ...] = ()
    """Interpreter names (basenames, globs) that read source files as data (a node-based
    agent reads the project's .js files): for them a script is only what their command line
    and environment name, or a `#!` file, not any file named like a script."""


@dataclass(frozen=True)
class ServiceRules:
    """The system-wide service (trustdb daemon): a default mode and per-uid / per-cgroup modes."""

    mode: Enforcement = Enforcement.ENFORCE
    per_uid: Mapping[int, Enforcement] = field(default_factory=lambda: MappingProxyType({}))
    per_cgroup: Mapping[str, Enforcement] = field(default_factory=lambda: MappingProxyType({}))
    """cgroup v2 path (relative to the cgroup root, e.g. `/system.slice/ci.service`) -> mode;
    the longest matching prefix wins."""

    def mode_for(self, uid: int | None = None, cgroup: str | None = None) -> Enforcement:
        """The mode of a task: its cgroup's rule, else its uid's, else the default."""
        if cgroup is not None:
            best = max((c for c in self.per_cgroup
                        if cgroup == c or cgroup.startswith(c.rstrip("/") + "/")),
                       key=len, default=None)
            if best is not None:
                return self.per_cgroup[best]
        if uid is not None and uid in self.per_uid:
            return self.per_uid[uid]
        return self.mode


@dataclass(frozen=True)
class Policy:
    name: str
    description: str = ""
    source: str = ""
    """The file it was read from."""
    mode: Enforcement = Enforcement.ENFORCE
    filesystem: FilesystemRules = FilesystemRules()
    network: NetworkRules = NetworkRules()
    jit: tuple[ProgramRef, ...] = ()
    """Trusted programs allowed anonymous executable memory. None: the tree runs under W^X."""
    interpreters: InterpreterRules = InterpreterRules()
    trust_compiler_outputs: bool = False
    """Files written by a trusted compiler/linker become trusted (mechanism: the service)."""
    service: ServiceRules = ServiceRules()

    def with_additions(self, *, read: Sequence[str] = (), write: Sequence[str] = (),
                       jit: Sequence[str] = (), audit: bool = False) -> Policy:
        """The one-off widening `run --allow-read/--allow-write/--allow-jit/--audit` asks for
        (on the command line, outside the tree: nothing inside can ask)."""
        fs = replace(self.filesystem,
                     read_only=(*self.filesystem.read_only, *read),
                     read_write=(*self.filesystem.read_write, *write))
        return replace(self, filesystem=fs,
                       jit=(*self.jit, *(ProgramRef(path=p) for p in jit)),
                       mode=Enforcement.AUDIT if audit else self.mode)

    def to_dict(self) -> dict[str, object]:
        """Plain values (`trustdb policy show --json`), every default filled in."""
        fs, net, interp, svc = self.filesystem, self.network, self.interpreters, self.service
        return {
            "name": self.name,
            "description": self.description,
            "source": self.source,
            "mode": self.mode.value,
            "filesystem": {"read_write": list(fs.read_write), "read_only": list(fs.read_only),
                           "no_access": list(fs.no_access), "private_tmp": fs.private_tmp,
                           "protected": list(fs.protected)},
            "network": {"mode": net.mode.value, "connect_tcp": list(net.connect_tcp),
                        "bind_tcp": list(net.bind_tcp), "udp": net.udp},
            "jit": {"programs": [str(r) for r in self.jit]},
            "interpreters": {"programs": [str(r) for r in interp.programs],
                             "scripts": interp.scripts.value,
                             "deny_inline": list(interp.deny_inline),
                             "read_sources": list(interp.read_sources)},
            "compilers": {"trust_outputs": self.trust_compiler_outputs},
            "service": {"mode": svc.mode.value,
                        "uids": {str(k): v.value for k, v in svc.per_uid.items()},
                        "cgroups": {k: v.value for k, v in svc.per_cgroup.items()}},
        }
