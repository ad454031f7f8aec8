"""dnf 4 in the service guest (its case is in tests/vm/guest_service.py): what Debian's dnf runs
and maps, to be trusted as a person would from its packages; its configuration on the guest's
tmpfs (the host's / is read-only there: cache, history, logs and Debian's rpm %_dbpath,
~/.rpmdb, all under WORK); the repository built on the host (tests/vm/test_service_vm.py); and
the `trustdb` command the dnf4 plugin (packaging/hooks/dnf4) runs. Imported in the guest only."""

from __future__ import annotations

import os
import shutil
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
PLUGIN_DIR = REPO / "packaging" / "hooks" / "dnf4"
BINDINGS = ("dnf", "hawkey", "libdnf", "rpm", "libcomps", "gpg")
"""Debian's python3 packages dnf imports C extensions from (dist-packages/<name>)."""
PACKAGE = "tdsvc-dnf"
PACKAGE_BIN = Path("/var/tmp/tdsvc-dnf/tdrpm")
COPIED_BY_POST = Path("/var/tmp/tdsvc-dnf/copied-by-post")


def missing(artifacts: Path) -> str | None:
    """Why the dnf case cannot run here, or None."""
    if not shutil.which("dnf"):
        return "dnf is not installed (packaging/apt-packages.txt lists dnf)"
    if not (artifacts / "dnf-repo" / "repodata" / "repomd.xml").exists():
        return "no repository was built (packaging/apt-packages.txt lists createrepo-c)"
    return None


def programs() -> list[str]:
    """dnf, Debian's python3 that runs it, its standard extension modules and dnf's bindings
    (the caller adds the libraries they link, as for the toolchain)."""
    python = os.path.realpath("/usr/bin/python3")
    dist = Path("/usr/lib/python3/dist-packages")
    found = [python, os.path.realpath("/usr/bin/dnf")]
    found += sorted(str(p) for name in BINDINGS for p in (dist / name).rglob("*.so"))
    dynload = Path("/usr/lib") / Path(python).name / "lib-dynload"
    found += sorted(str(p) for p in dynload.glob("*.so"))
    # What libsasl2 (under libcurl's libldap) dlopens at start: no ldd names it, and the
    # tracepoint backend kills a process that maps an untrusted library.
    found += sorted(str(p) for p in Path("/usr/lib/x86_64-linux-gnu/sasl2").glob("*.so*"))
    return found


def prepare(work: Path, artifacts: Path) -> dict[str, str]:
    """dnf's configuration and a `trustdb` on PATH for its plugin (a launcher like install.sh's,
    run by this suite's interpreter): call before the database is filled (the launcher is
    trusted with the rest). Returns the environment dnf runs with."""
    base = work / "dnf"
    bindir = base / "bin"
    bindir.mkdir(parents=True, exist_ok=True)
    (base / "home").mkdir(exist_ok=True)
    launcher = bindir / "trustdb"
    launcher.write_text(f"#!/bin/sh\nexec {sys.executable} -c "
                        "'from trustdb.cli import main; main()' \"$@\"\n")
    launcher.chmod(0o755)
    (base / "repos.d").mkdir(exist_ok=True)
    (base / "dnf.conf").write_text(
        "[main]\ngpgcheck=0\ninstall_weak_deps=0\nkeepcache=0\n"
        f"reposdir={base / 'repos.d'}\ncachedir={base / 'cache'}\npersistdir={base / 'lib'}\n"
        f"logdir={base / 'log'}\npluginpath={PLUGIN_DIR}\npluginconfpath={PLUGIN_DIR}\n"
        f"[tdsvc]\nname=tdsvc\nbaseurl=file://{artifacts / 'dnf-repo'}\n")
    return {"HOME": str(base / "home"), "PATH": f"{bindir}:{os.environ.get('PATH', '')}"}


def launcher(work: Path) -> Path:
    return work / "dnf" / "bin" / "trustdb"


def rpmdb(work: Path) -> Path:
    """Debian's rpm keeps its database in $HOME/.rpmdb (%_dbpath)."""
    return work / "dnf" / "home" / ".rpmdb"


def install_command(work: Path) -> list[str]:
    return ["dnf", "-c", str(work / "dnf" / "dnf.conf"), "-y", "--releasever=12", "install",
            PACKAGE]
