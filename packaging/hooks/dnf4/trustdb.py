# trustdb: dnf4 plugin (installed in dnf's plugin path, e.g.
# /usr/lib/python3/dist-packages/dnf-plugins/trustdb.py, with trustdb.conf in /etc/dnf/plugins/).
# The trusted-installer window around each transaction: dnf4 is a Python process with librpm
# in-process, so no "trusted installer binary" writes its files; `installer-begin --pid` names
# this very process as the window's writer (root only: only root can create window tokens).
# Before the transaction, the trustdb service then trusts each file dnf closes from that moment
# (a scriptlet can run a binary its package just unpacked, under enforce); after it,
# `installer-end --rpm` imports the installroot's rpmdb and closes the window, revoking and
# reporting what the rpmdb does not vouch for. A failed import leaves the database as it was
# (fail closed) and does not fail dnf. The rpmdb imported is the one dnf's librpm used: rpm's
# %_dbpath in this process (Debian's rpm puts it in ~/.rpmdb, Fedora's in /usr/lib/sysimage/rpm),
# inside the installroot. Does nothing when the service is not running. A failed
# transaction skips `transaction()`: the window then ends when dnf exits, and what dnf wrote
# loses its trust (the daemon drops a window whose process is gone).
"""trustdb's trusted-installer window around dnf4 transactions."""

import logging
import os
import shutil
import subprocess

import dnf


def _trustdb():
    return shutil.which("trustdb") or "/usr/bin/trustdb"


class TrustdbWindow(dnf.Plugin):
    name = "trustdb"

    def __init__(self, base, cli):
        super().__init__(base, cli)
        self.base = base
        self._opened = False

    def _run(self, *args):
        try:
            r = subprocess.run([_trustdb(), "service", *args], check=False,
                               stdin=subprocess.DEVNULL)
        except OSError as e:
            logging.getLogger("dnf").warning("trustdb: %s", e)
            return False
        return r.returncode == 0

    def pre_transaction(self):
        if os.geteuid() == 0:
            self._opened = self._run("installer-begin", "--pid", str(os.getpid()))

    def transaction(self):
        if not self._opened:
            return
        self._opened = False
        root = self.base.conf.installroot or "/"
        args = ["installer-end", "--rpm", "--rpm-root", root, "--pid", str(os.getpid())]
        dbpath = _rpm_dbpath()
        if dbpath:
            args += ["--rpm-dbpath", dbpath]
        self._run(*args)


def _rpm_dbpath():
    """Where librpm in this process keeps its database (relative to the installroot)."""
    try:
        import rpm
    except ImportError:  # no binding: the importer looks where rpm usually keeps it
        return None
    try:
        path = rpm.expandMacro("%{_dbpath}")
    except rpm.error:
        return None
    return path if path.startswith("/") else None
