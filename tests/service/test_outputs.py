"""Trusted compiler outputs on the host: a real fanotify notification group (it answers nothing,
so it can deny nothing) marks a tmpfs this test mounts, and the real gcc/ld on this machine.
What ld closes is recorded as `built:<ld>` with provenance `built-by:`; a file written by cp or
python stays untrusted, and so does ld's output when another writer touched it after ld or still
holds it open. The system-wide run (`cc -o x x.c && ./x` under enforce) is in the VM tier
(tests/vm/guest_service.py)."""

from __future__ import annotations

import contextlib
import functools
import os
import select
import shutil
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from trustdb.db import TrustDB
from trustdb.first_seen_handler import FirstSeenHandler, HandlerConfig
from trustdb.hashing import hash_file
from trustdb.model import InodeKey
from trustdb.service import compilers
from trustdb.service.installers import ASK_TIMEOUT_S, InstallerTrust

SOURCE = '#include <stdio.h>\nint main(void) { puts("built %s"); return 0; }\n'


def test_program_names() -> None:
    assert compilers.program_name("/usr/bin/x86_64-linux-gnu-gcc-12") == "gcc"
    assert compilers.program_name("/usr/bin/x86_64-linux-gnu-ld.bfd") == "ld.bfd"
    assert compilers.program_name("/usr/lib/go-1.19/pkg/tool/linux_amd64/link") == "link"
    assert compilers.program_name("/usr/bin/clang-16") == "clang"
    for interpreter in ("/usr/bin/python3.11", "/usr/bin/perl", "/usr/bin/bash", "/bin/cp"):
        assert compilers.program_name(interpreter) is None


class _Engine:
    """What InstallerTrust needs of the service engine: the database and the kernel's keys
    (here the compilers' own keys, as the service's map would hold them)."""

    def __init__(self, db: TrustDB, keys: set[InodeKey]) -> None:
        self.db = db
        self.key_sink = keys

    def refresh(self) -> None:
        pass


@contextlib.contextmanager
def _watched_tmpfs(tmp_path: Path, keys: set[InodeKey], *, trust_outputs: bool,
                   ) -> Iterator[tuple[InstallerTrust, Path, TrustDB]]:
    """A tmpfs of the test's own, the close-write group marking only it, a database, and the
    kernel's keys as `keys` (the trusted writers' own)."""
    mnt = tmp_path / "fs"
    mnt.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64m", "tdout", str(mnt)],
                      check=False).returncode:
        pytest.skip("cannot mount a tmpfs here")
    db = TrustDB.open(tmp_path / "db", write=True)
    trust = InstallerTrust(trust_outputs=trust_outputs, filesystems=lambda: [str(mnt)])
    try:
        trust.start(_Engine(db, keys))  # type: ignore[arg-type]
        yield trust, mnt, db
    finally:
        trust.stop()
        db.close()
        subprocess.run(["umount", "-l", str(mnt)], check=False)


@pytest.fixture
def watch(tmp_path: Path) -> Iterator[tuple[InstallerTrust, Path, TrustDB]]:
    if os.geteuid() != 0 or shutil.which("cc") is None:
        pytest.skip("needs root (fanotify, mount) and a C compiler")
    keys = {InodeKey.from_stat(os.stat(p)) for p in compilers.candidate_paths()}
    with _watched_tmpfs(tmp_path, keys, trust_outputs=True) as (trust, mnt, db):
        assert trust.compilers is not None and trust.compilers.compilers, "no compiler marked"
        yield trust, mnt, db


def _build(mnt: Path, name: str, variant: str) -> Path:
    src = mnt / f"{name}.c"
    src.write_text(SOURCE.replace("%s", variant))
    out = mnt / name
    subprocess.run(["cc", "-o", str(out), str(src)], check=True)
    return out


def _trusted(db: TrustDB, path: Path) -> list[str]:
    digest = hash_file(str(path)).digests.blake3
    return [f"{r.label}|{r.origin}" for r in db.trusted_by(digest)]


def test_what_ld_writes_is_trusted_built_by(watch: tuple[InstallerTrust, Path, TrustDB]) -> None:
    trust, mnt, db = watch
    out = _build(mnt, "hello", "ok")
    trust.pump()
    found = _trusted(db, out)
    assert found and all("built-by:ld" in f for f in found), found
    ran = subprocess.run([str(out)], capture_output=True, text=True, check=True)
    assert ran.stdout == "built ok\n"


def test_cp_and_python_writes_stay_untrusted(watch: tuple[InstallerTrust, Path, TrustDB]) -> None:
    trust, mnt, db = watch
    out = _build(mnt, "base", "base")
    copied = mnt / "copied"
    subprocess.run(["cp", str(out), str(copied)], check=True)
    with open(copied, "ab") as f:
        f.write(b"cp")  # content ld never wrote
    by_python = mnt / "by-python"
    script = "import sys; open(sys.argv[2], 'wb').write(open(sys.argv[1], 'rb').read() + b'py')"
    subprocess.run([sys.executable, "-c", script, str(out), str(by_python)], check=True)
    trust.pump()
    assert _trusted(db, out)
    assert not _trusted(db, copied), "a file written by cp was trusted"
    assert not _trusted(db, by_python), "a file written by python was trusted"


def test_a_linkers_text_output_stays_untrusted(watch: tuple[InstallerTrust, Path, TrustDB]
                                               ) -> None:
    """The attack: a trusted linker writes text, not a program. `ld --oformat binary` of a
    payload wrapped as data writes the payload's bytes as they are, mode 0755; an exec of it
    fails with ENOEXEC and sh then runs it as a script. Only ELF objects a compiler or linker
    writes become trusted."""
    trust, mnt, db = watch
    payload = mnt / "payload"
    payload.write_text("echo pwned\n")
    wrapped, out = mnt / "payload.o", mnt / "out"
    subprocess.run(["ld", "-r", "-b", "binary", str(payload), "-o", str(wrapped)], check=True,
                   cwd=mnt)
    subprocess.run(["ld", "--oformat", "binary", "-o", str(out), str(wrapped)], check=True,
                   capture_output=True)
    assert out.read_text() == "echo pwned\n" and os.access(out, os.X_OK)
    elf = _build(mnt, "real", "real")
    trust.pump()
    assert _trusted(db, elf), "the linked program itself was not trusted"
    assert not _trusted(db, out), "text written by ld was trusted"


def test_a_later_writer_supersedes_ld(watch: tuple[InstallerTrust, Path, TrustDB]) -> None:
    """The attack on the close-to-read gap: ld closes, another program rewrites the file before
    the daemon reads the event. The daemon must not bless the rewritten content."""
    trust, mnt, db = watch
    out = _build(mnt, "raced", "raced")
    script = "import sys; f = open(sys.argv[1], 'r+b'); f.seek(0, 2); f.write(b'evil'); f.close()"
    subprocess.run([sys.executable, "-c", script, str(out)], check=True)
    trust.pump()
    assert not _trusted(db, out), "content rewritten after ld's close was trusted"


def test_a_writer_still_open_blocks_trust(watch: tuple[InstallerTrust, Path, TrustDB]) -> None:
    """ld closed, but someone else holds the file open for writing (and could write after the
    hash): no read lease, no trust."""
    trust, mnt, db = watch
    out = _build(mnt, "held", "held")
    script = "import sys, time; f = open(sys.argv[1], 'r+b'); print('open', flush=True); time.sleep(30)"
    holder = subprocess.Popen([sys.executable, "-c", script, str(out)], stdout=subprocess.PIPE,
                              text=True)
    try:
        assert holder.stdout is not None and holder.stdout.readline() == "open\n"
        trust.pump()
        assert not _trusted(db, out), "trusted while another writer held the file open"
    finally:
        holder.kill()
        holder.wait()


def test_a_compiler_run_in_another_mount_namespace_is_no_trusted_writer(
        watch: tuple[InstallerTrust, Path, TrustDB]) -> None:
    """The way out of `trustdb run` (reviewer): the tree, root in a mount namespace of its own
    whose /usr is the host's, runs the host's trusted cc; with the service trusting compiler
    outputs, its `cc -o evil` became trusted in the database the run itself follows. Every
    event's file must be open through one of the daemon's own mounts: here, after `unshare
    --mount`, cc, ld and the closed file are reached through copies of the mounts."""
    trust, mnt, db = watch
    src = mnt / "evil.c"
    src.write_text(SOURCE.replace("%s", "evil"))
    out = mnt / "evil"
    subprocess.run(["unshare", "--mount", "--propagation", "private", "--", "cc", "-o",
                    str(out), str(src)], check=True)
    trust.pump()
    assert not _trusted(db, out), "what a compiler wrote from another mount namespace was trusted"
    control = _build(mnt, "control", "control")
    trust.pump()
    assert _trusted(db, control), "the same build on the host was not"


def test_host_namespaces_tell_a_tree_process_apart() -> None:
    from trustdb.service.hostns import in_host_namespaces

    assert in_host_namespaces(os.getpid()) is True
    child = subprocess.Popen(["unshare", "--pid", "--fork", "--mount-proc", "--mount", "--",
                              "sleep", "30"])
    try:
        deadline = time.monotonic() + 10
        inner = None
        while inner is None and time.monotonic() < deadline:  # unshare's forked child: sleep
            kids = Path(f"/proc/{child.pid}/task/{child.pid}/children").read_text().split()
            inner = int(kids[0]) if kids else None
            time.sleep(0.02)
        assert inner is not None
        assert in_host_namespaces(inner) is False
    finally:
        child.kill()
        child.wait()
    assert in_host_namespaces(child.pid) is None  # gone


BIG_SOURCE = ('#include <stdio.h>\nstatic char big[48 << 20] = {1};\n'
              'int main(void) { puts(big[0] ? "built big" : ""); return 0; }\n')


def test_metadata_moving_while_hashed_keeps_trust(watch: tuple[InstallerTrust, Path, TrustDB]
                                                  ) -> None:
    """What failed CI's guest: rpm and dpkg rename, chmod and set the mtime of a file right after
    closing it, while the daemon hashes it. Its ctime moved mid-hash, the hash was thrown away as
    "changed while being hashed", and the %post that ran the new binary was denied. The read
    lease is what keeps the bytes still; metadata moving under it is no reason to distrust."""
    trust, mnt, db = watch
    src = mnt / "big.c"
    src.write_text(BIG_SOURCE)
    out = mnt / "big"
    subprocess.run(["cc", "-o", str(out), str(src)], check=True)
    assert out.stat().st_size > 48 << 20
    stop = threading.Event()

    def touch_metadata() -> None:  # as rpm's fsmSetmeta and rename do
        n = 0
        while not stop.is_set():
            n += 1
            os.chmod(out, 0o755 if n % 2 else 0o775)
            os.utime(out, ns=(n, n))

    toucher = threading.Thread(target=touch_metadata, daemon=True)
    toucher.start()
    try:
        trust.pump()
    finally:
        stop.set()
        toucher.join()
    assert _trusted(db, out), "a metadata change during the hash cost the output its trust"


class _Keys(set):  # type: ignore[type-arg]
    """The kernel map as the handler sees it (a set: inserts stay in the handler process)."""

    def add(self, keys: list[InodeKey]) -> None:  # type: ignore[override]
        self.update(keys)

    def remove(self, keys: list[InodeKey]) -> None:  # type: ignore[override]
        self.difference_update(keys)


def _answer_questions(trust: InstallerTrust, mnt: Path, stop: threading.Event) -> None:
    """The daemon's loop, reduced to its question channel. Before each answer it writes a file
    on the marked mount, as the daemon writes its log or a window token: that open raises a
    permission event the handler must answer while it waits for us."""
    ask_fd = trust.filenos()[1]
    n = 0
    while not stop.is_set():
        if select.select([ask_fd], [], [], 0.1)[0]:
            n += 1
            (mnt / f"daemon-wrote-{n}").write_text("a log line")
            trust.answer()


def test_first_seen_handler_asks_the_daemon(watch: tuple[InstallerTrust, Path, TrustDB],
                                            tmp_path: Path) -> None:
    """The system-wide race: `./x` runs before the daemon has read ld's close-write. The
    first-seen handler (a real one, in audit mode, marking only this test's tmpfs) answers the
    exec's permission event by asking the daemon, which drains the close-writes first. Two
    ways this went wrong in the enforcing guest: the handler closed the question channel with
    everything else it inherited (every such exec was denied, and the fd number, reused, was
    another file's), and the daemon, blocked in an open of its own, could not answer the
    handler that had to answer that open (15 s stalls, then a denial)."""
    trust, mnt, db = watch
    config = HandlerConfig(open_trust=trust.wrap_trust(functools.partial(TrustDB.open, db.path)),
                           keys=_Keys(), is_confined=None, enforce=False)
    handler = FirstSeenHandler(config)
    handler.start(mounts=[str(mnt)])
    stop = threading.Event()
    daemon = threading.Thread(target=_answer_questions, args=(trust, mnt, stop), daemon=True)
    daemon.start()
    try:
        out = _build(mnt, "asked", "asked")  # no pump: only the question makes the daemon look
        started = time.monotonic()
        ran = subprocess.run([str(out)], capture_output=True, text=True, check=True, timeout=60)
        took = time.monotonic() - started
        assert ran.stdout == "built asked\n"
        denied = [d for d in handler.denials() if d.path == str(out)]
        stats = handler.stats()
        assert not denied, f"the handler found {out} untrusted: {denied}"
        assert stats["errors"] == 0 and stats["inserted"] == 1, stats
        assert took < ASK_TIMEOUT_S, f"the question waited {took:.1f} s: it timed out"
        assert _trusted(db, out)
    finally:
        stop.set()
        daemon.join()
        handler.stop()


def test_dpkg_in_a_window_is_trusted_at_close(tmp_path: Path) -> None:
    """The trusted-installer side of the same machinery: a window open, a real `dpkg -i` into a
    tmpfs (its own admindir and instdir): what dpkg closed is trusted `installed-by:dpkg`."""
    from tests.vm.test_service_vm import build_test_deb
    from trustdb.service import installers

    if os.geteuid() != 0 or shutil.which("dpkg") is None:
        pytest.skip("needs root and dpkg")
    dpkg = os.path.realpath(shutil.which("dpkg") or "")
    window = installers.WINDOW_DIR / f"test-{os.getpid()}.open"
    with _watched_tmpfs(tmp_path, {InodeKey.from_stat(os.stat(dpkg))},
                        trust_outputs=False) as (trust, mnt, db):
        try:
            installers.WINDOW_DIR.mkdir(parents=True, exist_ok=True)
            window.write_text(str(os.getpid()))
            trust.sync_windows()
            deb = build_test_deb(tmp_path)
            admin = mnt / "admin"
            for sub in ("updates", "info", "triggers"):
                (admin / sub).mkdir(parents=True)
            (admin / "status").touch()
            r = subprocess.run(["dpkg", f"--admindir={admin}", f"--instdir={mnt}",
                                "--force-depends", "--force-not-root",
                                "--force-script-chrootless", "--unpack", str(deb)],
                               capture_output=True, text=True, check=False)
            assert r.returncode == 0, r.stderr
            trust.pump()
            found = _trusted(db, mnt / "var/tmp/tdsvc-pkg/tdnew")
            assert found and all("installed-by:dpkg" in f for f in found), found
        finally:
            window.unlink(missing_ok=True)
