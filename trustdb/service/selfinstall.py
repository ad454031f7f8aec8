"""trustdb's own install as a trust source (`trustdb service trust-self`), verified against its
own file digests, so that enforcing never denies trustdb itself (its CLI, the hooks, the daemon):

- the Python tree trustdb runs from (/usr/lib/trustdb/python for install.sh and the packages, or
  a venv): every file against its distribution's wheel RECORD (SHA-256), trustdb's own wheel
  and its pinned dependencies alike (trustdb_importers.python);
- the files outside that tree (the /usr/bin/trustdb launcher, the BPF objects of install.sh):
  against the .deb's md5sums (dpkg's info/trustdb.md5sums) when dpkg installed trustdb, else
  against the SHA-256 list install.sh wrote when it installed them, or, for the .rpm, the
  rpmdb's file digests of package trustdb (which the %post writes out).

Source `self:trustdb`: install.sh, the .deb postinst and the rpm %post run this; `trustdb
sources` shows it. A file whose content does not match is skipped and reported (exit non-zero).
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import trustdb
from trustdb.hashing import HashingError, hash_file
from trustdb.model import SkippedEntry, TrustEntry
from trustdb_importers.interface import DigestCache, SourceInfo
from trustdb_importers.python import PythonImporter

LABEL = "self:trustdb"
DPKG_MD5SUMS = "/var/lib/dpkg/info/trustdb.md5sums"
INSTALL_SHA256 = "/usr/lib/trustdb/installed-files.sha256"
RPM_SHA256 = "/var/lib/trustdb/rpm-files.sha256"
"""Written by the rpm %post from the rpmdb's own file digests (SHA-256)."""


def own_site() -> str:
    """The site directory that holds the running trustdb package."""
    return str(Path(trustdb.__file__).resolve().parent.parent)


def digest_list(md5sums: str = DPKG_MD5SUMS, sha256s: str = INSTALL_SHA256,
                root: str = "/") -> tuple[str, dict[str, str]]:
    """('md5' | 'sha256', {absolute path: hex digest}) for the files outside the Python tree."""
    for algo, listing in (("md5", md5sums), ("sha256", sha256s), ("sha256", RPM_SHA256)):
        try:
            text = Path(listing).read_text()
        except OSError:
            continue
        out = {}
        for line in text.splitlines():
            digest, _, rel = line.partition("  ")
            if digest and rel:
                out[os.path.join(root, rel.lstrip("/"))] = digest.strip()
        return algo, out
    return "sha256", {}


class SelfImporter(PythonImporter):
    name = "self"

    def __init__(self, *, site: str | None = None, md5sums: str = DPKG_MD5SUMS,
                 sha256s: str = INSTALL_SHA256) -> None:
        super().__init__(path=site or own_site())
        self._lists = (md5sums, sha256s)

    def source(self) -> SourceInfo:
        return SourceInfo(label=LABEL, kind=self.name)

    def collect(self, cache: DigestCache) -> Iterator[TrustEntry | SkippedEntry]:
        yield from super().collect(cache)
        algo, listed = digest_list(*self._lists)
        site = self.path.rstrip("/") + "/"
        for path, want in sorted(listed.items()):
            if path.startswith(site):
                continue  # verified against the wheel RECORDs above
            yield _verified(path, algo, want)


def _verified(path: str, algo: str, want: str) -> TrustEntry | SkippedEntry:
    try:
        hashed = hash_file(path, want_md5=algo == "md5", want_sha256=algo == "sha256",
                           executable_only=True)
    except HashingError as e:
        return SkippedEntry(path, str(e), origin="trustdb", fatal=False)
    except OSError as e:
        return SkippedEntry(path, e.strerror or str(e), origin="trustdb", fatal=True)
    d = hashed.digests
    got = d.md5 if algo == "md5" else d.sha256
    if got is None or got.hex() != want.lower():
        return SkippedEntry(path, f"{algo} mismatch (tampered or locally modified)",
                            origin="trustdb", fatal=True)
    return TrustEntry(path=path, digest=d.blake3, size=d.size, kind=d.kind,
                      sha256=d.sha256, md5=d.md5, origin="trustdb")
