"""The policy's JIT and interpreter entries as the kernel sees them: inode keys with flag bits,
resolved after the mirror's first sync and handed to the backend (`set_program_flags`).

A program named by path counts only if its current content is trusted (the mirror verifies it,
as for an exec); a program named by digest counts wherever that trusted content lives.
"""

from __future__ import annotations

import fnmatch
import glob
import os
import re
from collections.abc import Callable, Iterable, Sequence
from typing import Protocol

from trustdb.abi import ProgramFlag
from trustdb.model import InodeKey
from trustdb.policy.model import Policy, ProgramRef
from trustdb.script_args import names


class _Mirror(Protocol):
    def verify_file(self, target: str | int) -> InodeKey | None: ...

    def keys_for(self, digest: bytes) -> list[InodeKey]: ...


def program_refs(policy: Policy) -> list[tuple[ProgramRef, int]]:
    refs = [(r, int(ProgramFlag.JIT)) for r in policy.jit]
    refs += [(r, int(ProgramFlag.INTERPRETER)) for r in policy.interpreters.programs]
    return refs


def _paths(ref: ProgramRef) -> list[str]:
    assert ref.path is not None
    pattern = os.path.expanduser(ref.path)
    found = glob.glob(pattern) if glob.has_magic(pattern) else [pattern]
    return sorted({os.path.realpath(p) for p in found if os.path.isfile(p)})


def resolve_program_flags(refs: Iterable[tuple[ProgramRef, int]], mirror: _Mirror,
                          warn: Callable[[str], None]) -> list[tuple[InodeKey, int]]:
    """(key, flags) for every trusted program the refs name; untrusted or missing ones are
    left out (`warn` says so for JITs: the user asked for them)."""
    flags: dict[InodeKey, int] = {}
    for ref, flag in refs:
        if ref.digest is not None:
            keys: Sequence[InodeKey] = mirror.keys_for(bytes.fromhex(ref.digest))
            if not keys and flag & ProgramFlag.JIT:
                warn(f"JIT {ref}: no trusted file has this content; not allowed")
        else:
            keys = []
            for path in _paths(ref):
                key = mirror.verify_file(path)
                if key is None:
                    if flag & ProgramFlag.JIT:
                        warn(f"JIT {path}: its content is not trusted; not allowed "
                             f"(trustdb trust {path})")
                    continue
                keys.append(key)
        for key in keys:
            flags[key] = flags.get(key, 0) | flag
    return sorted(flags.items(), key=lambda kv: (kv[0].dev, kv[0].ino))


def interpreter_digests(policy: Policy,
                        cached: Callable[[str], bytes | None] | None = None,
                        recorded: dict[bytes, str] | None = None) -> dict[bytes, str]:
    """Content digest -> interpreter name, for the policy's interpreters (the first-seen
    handler's script rule: an interpreter is known by its content, wherever it is copied, and
    its command line is read as that interpreter reads it, whatever it is called now).
    `cached`: the digest the database's verification cache holds for a path's current inode
    key, if any (hashing the interpreters on every `trustdb run` cost 60-150 ms of its start).
    Besides the files the policy names, every trusted content that its source recorded under an
    interpreter's name counts (`recorded`, from `recorded_interpreters`): pyenv's, conda's or a
    venv's `bin/python3.11`, nvm's `bin/node`, copied or renamed anywhere later."""
    from trustdb.hashing import HashingError, hash_file

    digests: dict[bytes, str] = {}
    for ref in policy.interpreters.programs:
        if ref.digest is not None:
            digests.setdefault(bytes.fromhex(ref.digest), "")
            continue
        for path in _paths(ref):
            digest = cached(path) if cached is not None else None
            try:
                digests[digest if digest is not None else hash_file(path).digests.blake3] = (
                    os.path.basename(path))
            except (HashingError, OSError):
                continue
    for digest, name in (recorded or {}).items():
        digests.setdefault(digest, name)
    return digests


def interpreter_names(policy: Policy) -> re.Pattern[str] | None:
    """One expression for the basenames of the policy's interpreters (their globs): matched
    against every recorded path at each `run`, where one fnmatch call per glob per path cost
    0.1-0.2 s (issue 11, profiled)."""
    patterns = names(r.path for r in policy.interpreters.programs if r.path)
    if not patterns:
        return None
    return re.compile("|".join(fnmatch.translate(p) for p in patterns))


def recorded_interpreters(policy: Policy,
                          records: Iterable[tuple[str, bytes]]) -> dict[bytes, str]:
    """Trusted contents recorded under the name of one of the policy's interpreters."""
    pattern = interpreter_names(policy)
    out: dict[bytes, str] = {}
    if pattern is None:
        return out
    for path, digest in records:
        base = path.rpartition("/")[2]
        if digest not in out and pattern.match(base):
            out[digest] = base
    return out


def interpreter_refs(digests: Iterable[bytes]) -> list[tuple[ProgramRef, int]]:
    """The interpreters known by content, as kernel program flags (lsm: their opens of script
    files are judged in the kernel too)."""
    return [(ProgramRef(digest=d.hex()), int(ProgramFlag.INTERPRETER)) for d in sorted(digests)]
