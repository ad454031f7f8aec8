"""Python environments: the distributions installed in a venv or a site-packages directory.

Each `*.dist-info/RECORD` lists the files the installer wrote with their SHA-256
(urlsafe base64, no padding) and size; every file is verified on disk against it (see `ondisk`)
and recorded with provenance `name==version`. What is recorded: executable content (extension
modules, console scripts, anything with `#!` or an exec bit), like `trustdb trust`;
`all_files=True` records every verified file.

Reported and not trusted (the rest proceeds): a distribution without RECORD (Debian's
`python3-*` packages drop it, and legacy `.egg-info` installs never had one: trust those through
their package manager instead), a malformed RECORD, a mismatch. Refused as a whole
(`PythonImporterError`): a path that holds no Python distributions at all.
"""

from __future__ import annotations

import base64
import binascii
import csv
import functools
import glob
import os
from collections.abc import Iterator
from email.parser import BytesHeaderParser

from trustdb_importers.interface import DigestCache, ImporterError, SourceInfo
from trustdb_importers.ondisk import FileClaim, OnDiskImporter, PackageClaims, ProgressFn

from trustdb.model import SkippedEntry, TrustEntry

SITE_GLOBS = (
    "lib/python3*/site-packages",
    "lib64/python3*/site-packages",
    "lib/python3/dist-packages",
    "local/lib/python3*/dist-packages",
)
"""Where a prefix (a venv, /usr, /usr/local) keeps its distributions."""


class PythonImporterError(ImporterError):
    """A path holds no Python environment: the import is refused."""


class PythonImporter(OnDiskImporter):
    """All distributions of one environment (a venv or prefix, or one site-packages dir)."""

    name = "python"

    def __init__(
        self, *, path: str, all_files: bool = False, progress: ProgressFn | None = None
    ) -> None:
        super().__init__(root="/", all_files=all_files, progress=progress)
        self.path = os.path.abspath(path)

    def source(self) -> SourceInfo:
        return SourceInfo(label=f"python:{self.path}", kind=self.name)

    def site_dirs(self) -> list[str]:
        """The site directories of the path: itself if it holds distributions, else its prefix's."""
        if not os.path.isdir(self.path):
            raise PythonImporterError(f"{self.path}: not a directory")
        if _distributions(self.path):
            return [self.path]
        found: dict[str, str] = {}  # realpath -> path, so lib64 -> lib is read once
        for pattern in SITE_GLOBS:
            for site in sorted(glob.glob(os.path.join(self.path, pattern))):
                found.setdefault(os.path.realpath(site), site)
        if not found:
            raise PythonImporterError(
                f"{self.path}: no Python environment here (no *.dist-info, no "
                "lib/python3*/site-packages)"
            )
        return list(found.values())

    def collect(self, cache: DigestCache) -> Iterator[TrustEntry | SkippedEntry]:
        dists = [d for site in self.site_dirs() for d in _distributions(site)]
        yield from self.verify(
            (functools.partial(distribution_claims, d) for d in dists), len(dists), cache
        )


def _distributions(site: str) -> list[str]:
    try:
        names = sorted(os.listdir(site))
    except OSError as e:
        raise PythonImporterError(f"{site}: cannot list: {e.strerror}") from e
    return [
        os.path.join(site, n)
        for n in names
        if n.endswith((".dist-info", ".egg-info")) and os.path.isdir(os.path.join(site, n))
    ]


def _provenance(meta_dir: str) -> str:
    """`name==version` from METADATA (PKG-INFO for egg-info), or the directory name."""
    for meta in ("METADATA", "PKG-INFO"):
        try:
            with open(os.path.join(meta_dir, meta), "rb") as f:
                msg = BytesHeaderParser().parse(f)
        except OSError:
            continue
        if msg["Name"] and msg["Version"]:
            return f"{msg['Name']}=={msg['Version']}"
    return os.path.basename(meta_dir).rsplit(".", 1)[0].replace("-", "==", 1)


def distribution_claims(meta_dir: str) -> PackageClaims:
    """Every file of one distribution with the SHA-256 its RECORD gives."""
    origin = _provenance(meta_dir)
    record = os.path.join(meta_dir, "RECORD")
    site = os.path.dirname(meta_dir)
    if meta_dir.endswith(".egg-info") or not os.path.exists(record):
        why = "legacy egg-info" if meta_dir.endswith(".egg-info") else "no RECORD file"
        reason = f"{why}: the distribution's files are unverifiable and not trusted"
        return PackageClaims(origin, (), (SkippedEntry(meta_dir, reason, origin),))
    claims: list[FileClaim] = []
    skipped: list[SkippedEntry] = []
    try:
        with open(record, encoding="utf-8", newline="") as f:
            rows = list(csv.reader(f))
    except (OSError, UnicodeDecodeError, csv.Error) as e:
        reason = f"unreadable RECORD: {e}: the distribution's files are not trusted"
        return PackageClaims(origin, (), (SkippedEntry(record, reason, origin, fatal=True),))
    for n, row in enumerate(rows, 1):
        if not row:
            continue
        if len(row) != 3:
            skipped.append(SkippedEntry(f"{record}:{n}", "malformed RECORD line", origin, True))
            continue
        path = os.path.normpath(os.path.join(site, row[0]))
        try:
            claims.append(_claim(path, row[1], row[2]))
        except ValueError as e:
            skipped.append(
                SkippedEntry(f"{record}:{n}", f"malformed RECORD line: {e}", origin, True)
            )
    return PackageClaims(origin, tuple(claims), tuple(skipped))


def _claim(path: str, digest: str, size: str) -> FileClaim:
    algo, _, value = digest.partition("=")
    if not digest or algo != "sha256":
        # No hash (RECORD itself, .pyc) or one we do not check: unverifiable if executable.
        return FileClaim(path, None, None)
    try:
        raw = base64.urlsafe_b64decode(value + "=" * (-len(value) % 4))
    except binascii.Error as e:
        raise ValueError("bad base64 digest") from e
    if len(raw) != 32:
        raise ValueError("sha256 digest of the wrong length")
    return FileClaim(path, "sha256", raw, int(size) if size else None)
