"""Installed Debian packages, from dpkg's own database (fapolicyd's deb-backend, read in Python).

What is read, under `--admindir` (default `ROOT/var/lib/dpkg`):
- `status` (deb822, parsed here: `status_paragraphs`): which packages are installed, their version and
  architecture, and the MD5 of each conffile (`Conffiles:`).
- `info/PKG[:ARCH].md5sums`: the MD5 dpkg recorded for each file the package shipped.
- `info/PKG[:ARCH].list`: every path the package owns; a regular file listed here with no MD5
  is reported as unverifiable.
- `diversions`: a file diverted by another package lives at its diverted name.
- `ROOT/etc/dpkg/dpkg.cfg{.d/*,}`: `path-exclude` (minimal and container images drop
  documentation this way): an excluded file that is absent is expected, not reported.

dpkg keeps nothing stronger than MD5, so MD5 only ties the file on disk to the package; what is
recorded is the BLAKE3 (and SHA-256) of the same bytes, read once. What is recorded: executable
content (ELF, `#!`, exec bit), the same rule as `trustdb trust`; `all_files=True` records every
verified file. Mismatches are reported and not trusted; the rest of the import proceeds.

Refused as a whole (`DebImporterError`, nothing written): a missing or unparsable `status` file,
an unreadable `info/` directory. Per package (reported, the rest proceeds): a missing or
unreadable md5sums file, a malformed md5sums line.
"""

from __future__ import annotations

import fnmatch
import functools
import os
import re
from collections.abc import Iterator
from dataclasses import dataclass

import blake3
from trustdb_importers.interface import DigestCache, ImporterError, SourceInfo
from trustdb_importers.ondisk import (
    FileClaim,
    FingerprintedPackage,
    OnDiskImporter,
    PackageClaims,
    ProgressFn,
)

from trustdb.model import SkippedEntry, StreamItem

DEFAULT_ADMINDIR = "var/lib/dpkg"

FILE_STATES = frozenset(
    {"installed", "unpacked", "half-configured", "triggers-awaited", "triggers-pending"}
)
"""dpkg states in which a package's files are fully unpacked on disk (and its md5sums exist)."""


class DebImporterError(ImporterError):
    """The dpkg database as a whole cannot be read: the import is refused."""


@dataclass(frozen=True, slots=True)
class DebPackage:
    name: str
    version: str
    architecture: str
    conffiles: dict[str, bytes]
    """Conffile path -> MD5, for conffiles still shipped (not `obsolete`)."""

    @property
    def origin(self) -> str:
        return f"{self.name}_{self.version}_{self.architecture}"


class DebImporter(OnDiskImporter):
    """Every installed package of one dpkg database, verified on disk."""

    name = "deb"

    def __init__(
        self,
        *,
        root: str = "/",
        admindir: str | None = None,
        all_files: bool = False,
        progress: ProgressFn | None = None,
    ) -> None:
        super().__init__(root=root, all_files=all_files, progress=progress)
        default_admin = os.path.join(self.root.path, DEFAULT_ADMINDIR)
        self.admindir = os.path.abspath(admindir) if admindir else default_admin
        self._custom_admindir = self.admindir != default_admin

    def source(self) -> SourceInfo:
        label = f"deb:{self.root.path}"
        if self._custom_admindir:
            label += f"@{self.admindir}"
        return SourceInfo(label=label, kind=self.name)

    def collect(self, cache: DigestCache) -> Iterator[StreamItem]:
        packages = read_status(os.path.join(self.admindir, "status"))
        diversions = read_diversions(os.path.join(self.admindir, "diversions"))
        info = InfoDir.read(os.path.join(self.admindir, "info"))
        filters = PathFilters.read(self.root.host_path("etc/dpkg"))
        # 3: part records remember a package's skips (SCHEMA: P); a trustdb that reads only
        # their recorded files must not match them, or it would keep a failed package silently.
        common = repr((3, self.root.path, self.all_files, sorted(diversions.items()), filters))
        claims = (
            FingerprintedPackage(
                pkg.origin,
                _fingerprint(common, pkg, info),
                functools.partial(package_claims, pkg, info, diversions, filters),
            )
            for pkg in packages
        )
        yield from self.verify(claims, len(packages), cache)


def _fingerprint(common: str, pkg: DebPackage, info: InfoDir) -> bytes:
    """Everything `package_claims` reads for the package, by value or by stat key: its status
    fields, its md5sums and list files (inode, ctime, mtime, size: dpkg rewrites them on
    every install), and the import's options, diversions and path filters (`common`)."""
    keys = []
    for suffix in ("md5sums", "list"):
        path = info.find(pkg, suffix)
        try:
            st = os.stat(path) if path is not None else None
        except OSError:
            st = None
        keys.append(
            (path, st.st_dev, st.st_ino, st.st_ctime_ns, st.st_mtime_ns, st.st_size)
            if st is not None
            else None
        )
    text = repr((common, pkg.origin, sorted(pkg.conffiles.items()), keys))
    return blake3.blake3(text.encode("utf-8", "surrogateescape")).digest()


STATUS_FIELDS = frozenset({"Package", "Status", "Version", "Architecture", "Conffiles"})


def read_status(path: str) -> list[DebPackage]:
    """Installed packages from dpkg's status file. Refuses a file it cannot fully trust."""
    try:
        with open(path, "rb") as f:
            text = f.read().decode("utf-8")
    except FileNotFoundError as e:
        raise DebImporterError(f"no dpkg database: {path} does not exist") from e
    except OSError as e:
        raise DebImporterError(f"cannot read {path}: {e.strerror}") from e
    except UnicodeDecodeError as e:
        raise DebImporterError(f"broken dpkg status file {path}: {e}") from e
    try:
        paragraphs = status_paragraphs(text)
    except ValueError as e:
        raise DebImporterError(f"broken dpkg status file {path}: {e}") from e
    packages = []
    for n, para in enumerate(paragraphs, 1):
        name = para.get("Package")
        status = para.get("Status", "").split()
        if not name or len(status) != 3:
            what = f"package {name}" if name else f"paragraph {n}"
            raise DebImporterError(
                f"broken dpkg status file {path}: {what} has no valid Package/Status field"
            )
        if status[2] not in FILE_STATES:
            continue
        version = para.get("Version")
        if not version:
            raise DebImporterError(f"broken dpkg status file {path}: {name} has no Version")
        packages.append(
            DebPackage(
                name=name,
                version=version,
                architecture=para.get("Architecture", "all"),
                conffiles=_conffiles(para.get("Conffiles", "")),
            )
        )
    return packages


def status_paragraphs(text: str) -> list[dict[str, str]]:
    """The paragraphs of a deb822 file that dpkg wrote, with only the fields `read_status` uses
    (continuation lines joined by newlines, as python-debian gives them). Parsed here rather
    than with python-debian: its import and parser were a fifth of an unchanged re-import
    (issue 11, profiled); tests/importers/test_deb.py checks both agree on this machine's file."""
    paragraphs: list[dict[str, str]] = []
    para: dict[str, str] = {}
    name = ""
    for n, line in enumerate(text.split("\n"), 1):
        if not line.strip():
            if para:
                paragraphs.append(para)
                para, name = {}, ""
            continue
        if line[0] in " \t":
            if name:  # else a continuation of a field not kept
                para[name] += "\n" + line.rstrip()
            continue
        field, sep, value = line.partition(":")
        if not sep or not field or field[0] == "#":
            raise ValueError(f"line {n} is not a field")
        name = field if field in STATUS_FIELDS else ""
        if name:
            para[name] = value.strip()
    if para:
        paragraphs.append(para)
    return paragraphs


def _conffiles(field: str) -> dict[str, bytes]:
    result = {}
    for line in field.splitlines():
        parts = line.split()
        # " /etc/foo <md5> [obsolete|remove-on-upgrade]"; `newconffile` until first configured.
        if len(parts) < 2 or "obsolete" in parts[2:] or len(parts[1]) != 32:
            continue
        try:
            result[parts[0]] = bytes.fromhex(parts[1])
        except ValueError:
            continue
    return result


def read_diversions(path: str) -> dict[str, tuple[str, str]]:
    """Diverted path -> (where it lives now, diverting package; `:` means a local diversion)."""
    try:
        with open(path, encoding="utf-8", errors="surrogateescape") as f:
            lines = f.read().splitlines()
    except FileNotFoundError:
        return {}
    except OSError as e:
        raise DebImporterError(f"cannot read {path}: {e.strerror}") from e
    if len(lines) % 3:
        raise DebImporterError(f"broken dpkg diversions file {path}: not in triples of lines")
    return {lines[i]: (lines[i + 1], lines[i + 2]) for i in range(0, len(lines), 3)}


@dataclass(frozen=True, slots=True)
class InfoDir:
    """dpkg's `info/` directory, listed once (one stat per package file would cost more)."""

    path: str
    names: frozenset[str]

    @classmethod
    def read(cls, path: str) -> InfoDir:
        try:
            return cls(path, frozenset(os.listdir(path)))
        except OSError as e:
            raise DebImporterError(f"dpkg database incomplete: cannot list {path}: {e}") from e

    def find(self, pkg: DebPackage, suffix: str) -> str | None:
        # Multi-Arch: same packages keep `PKG:ARCH.*`, all others `PKG.*`.
        for name in (f"{pkg.name}:{pkg.architecture}.{suffix}", f"{pkg.name}.{suffix}"):
            if name in self.names:
                return os.path.join(self.path, name)
        return None


def _read_lines(path: str) -> list[str]:
    with open(path, encoding="utf-8", errors="surrogateescape") as f:
        return f.read().splitlines()


_DPKG_OPTION = re.compile(r"\s*([a-z-]+)\s*(?:=|\s)\s*(\S.*?)\s*$")
"""`option=value` or `option value`, as in dpkg.cfg."""


@dataclass(frozen=True, slots=True)
class PathFilters:
    """dpkg's path-exclude/path-include options, in the order dpkg reads them."""

    rules: tuple[tuple[bool, str], ...]
    """(excluded?, glob); the last rule that matches a path decides."""

    @classmethod
    def read(cls, etc_dpkg: str) -> PathFilters:
        # dpkg reads dpkg.cfg.d/* in name order, then dpkg.cfg (dpkg(1), "FILES").
        conf_d = os.path.join(etc_dpkg, "dpkg.cfg.d")
        try:
            names = sorted(n for n in os.listdir(conf_d) if not n.startswith("."))
        except OSError:
            names = []
        rules: list[tuple[bool, str]] = []
        for path in [os.path.join(conf_d, n) for n in names] + [os.path.join(etc_dpkg, "dpkg.cfg")]:
            try:
                lines = _read_lines(path)
            except OSError:
                continue
            for line in lines:
                m = _DPKG_OPTION.match(line)
                if m and m[1] in ("path-exclude", "path-include"):
                    rules.append((m[1] == "path-exclude", m[2]))
        return cls(tuple(rules))

    def excluded(self, path: str) -> bool:
        verdict = False
        for exclude, pattern in self.rules:
            if fnmatch.fnmatchcase(path, pattern):  # like dpkg's fnmatch(3): `*` matches `/`
                verdict = exclude
        return verdict


def package_claims(
    pkg: DebPackage,
    info: InfoDir,
    diversions: dict[str, tuple[str, str]],
    filters: PathFilters = PathFilters(()),
) -> PackageClaims:
    """Every file the package claims, with its MD5 where dpkg recorded one."""
    skipped: list[SkippedEntry] = []
    digests: dict[str, bytes] = {}
    md5sums = info.find(pkg, "md5sums")
    if md5sums is None:
        skipped.append(
            SkippedEntry(
                os.path.join(info.path, f"{pkg.name}.md5sums"),
                "package has no md5sums file: its files are unverifiable",
                pkg.origin,
            )
        )
    else:
        try:
            lines = _read_lines(md5sums)
        except OSError as e:
            lines = []
            skipped.append(
                SkippedEntry(md5sums, f"unreadable: {e.strerror}", pkg.origin, fatal=True)
            )
        for n, line in enumerate(lines, 1):
            md5, sep, rel = line.partition("  ")
            try:
                digest = bytes.fromhex(md5)
            except ValueError:
                digest = b""
            if not sep or len(digest) != 16 or not rel:
                skipped.append(
                    SkippedEntry(f"{md5sums}:{n}", "malformed md5sums line", pkg.origin, True)
                )
                continue
            digests["/" + (rel.removeprefix("./")).lstrip("/")] = digest
    digests.update(pkg.conffiles)
    claims = [
        FileClaim(
            _where(p, pkg, diversions),
            "md5",
            d,
            optional=filters.excluded(p),
            config=p in pkg.conffiles,
        )
        for p, d in digests.items()
    ]
    listed = info.find(pkg, "list")
    if listed is not None:
        try:
            paths = _read_lines(listed)
        except OSError:
            paths = []  # the md5sums claims still stand; .list only adds unverifiable ones
        for path in paths:
            if path not in digests and path not in ("/", "/."):
                claims.append(FileClaim(_where(path, pkg, diversions), None, None))
    return PackageClaims(pkg.origin, tuple(claims), tuple(skipped))


def _where(path: str, pkg: DebPackage, diversions: dict[str, tuple[str, str]]) -> str:
    """Where the package's copy of path lives: its diverted name if another package diverts it."""
    diverted = diversions.get(path)
    if diverted is not None and diverted[1] != pkg.name:
        return diverted[0]
    return path
