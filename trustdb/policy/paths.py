"""A policy's path patterns made concrete for one run: `~`, $WORKDIR, $HOME, $TMPDIR, globs."""

from __future__ import annotations

import glob
import os
import pwd
import re
from collections.abc import Iterable
from dataclasses import dataclass

from trustdb.policy.model import FilesystemRules


@dataclass(frozen=True)
class ResolvedFilesystem:
    """Absolute, existing paths (what does not exist cannot be granted or covered)."""

    read_write: tuple[str, ...]
    read_only: tuple[str, ...]
    no_access: tuple[str, ...]
    private_tmp: bool
    protected: tuple[str, ...] = ()
    """Existing paths inside the read-write grants that stay read-only."""
    pinned: tuple[str, ...] = ()
    """Directories holding protected paths (`.git` for `.git/config`): kept in place."""


def user_homes() -> list[str]:
    """The invoking user's home first (the one behind sudo, if any), then $HOME."""
    homes = []
    sudo_user = os.environ.get("SUDO_USER")
    if sudo_user:
        try:
            homes.append(pwd.getpwnam(sudo_user).pw_dir)
        except KeyError:
            pass
    homes.append(os.environ.get("HOME") or pwd.getpwuid(os.getuid()).pw_dir)
    return list(dict.fromkeys(os.path.normpath(h) for h in homes))


def expand(pattern: str, variables: dict[str, str], homes: list[str]) -> list[str]:
    """Every existing path `pattern` names (one pattern may name several: globs, two homes)."""
    bases = [pattern]
    if pattern == "~" or pattern.startswith("~/"):
        bases = [h + pattern[1:] for h in homes]
    out = []
    for base in bases:
        text = re.sub(r"\$\{?([A-Z_]+)\}?", lambda m: variables.get(m.group(1), m.group(0)), base)
        if glob.has_magic(text):
            out += sorted(glob.glob(text, include_hidden=True))
        elif os.path.lexists(text):
            out.append(text)
    return [os.path.normpath(p) for p in out]


def resolve(rules: FilesystemRules, workdir: str, *, homes: list[str] | None = None) -> ResolvedFilesystem:
    homes = homes if homes is not None else user_homes()
    variables = {"WORKDIR": workdir, "HOME": homes[0], "TMPDIR": "/tmp"}

    def all_of(patterns: Iterable[str], only_first_home: bool) -> tuple[str, ...]:
        found: list[str] = []
        for p in patterns:
            found += expand(p, variables, homes[:1] if only_first_home else homes)
        return tuple(dict.fromkeys(found))

    read_write = all_of(rules.read_write, True)
    protected: list[str] = []
    pinned: list[str] = []
    for name in rules.protected:
        if name.startswith(("/", "~", "$")):
            protected += expand(name, variables, homes)
        else:
            for grant in read_write:
                found = expand(os.path.join(grant, name), variables, homes)
                protected += found
                top = name.split("/", 1)[0]
                if found and top != name:
                    pinned += expand(os.path.join(grant, top), variables, homes)
    inside = [p for p in protected
              if any(p.startswith(g.rstrip("/") + "/") for g in read_write)]
    return ResolvedFilesystem(
        read_write=read_write,
        protected=tuple(dict.fromkeys(inside)),
        pinned=tuple(dict.fromkeys(pinned)),
        read_only=all_of(rules.read_only, True),
        no_access=all_of(rules.no_access, False),
        private_tmp=rules.private_tmp,
    )
