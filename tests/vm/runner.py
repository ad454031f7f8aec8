"""Boot a stock Debian kernel in QEMU and run one command in it, against the host's own files.

The BPF LSM tier needs a kernel that accepts `lsm/*` programs; this machine's does not, so the
tests boot Debian's 6.1 and 6.12 kernels (packaging/install-vm-kernels.sh) under TCG (the /dev/kvm
here only runs PVM guests) with `bpf` in `lsm=`. The guest sees:

- the host's `/` read-only over virtio-9p, so the host's Python, trustdb and BPF objects run as is;
- tmpfs on /tmp, /run, /var/tmp, /dev/shm (so files a test creates live on a guest filesystem,
  not on an overlay: inode keys stay exact), proc, sysfs, devtmpfs, cgroup2 at /sys/fs/cgroup,
  securityfs, bpffs, tracefs;
- read-write 9p shares at their host paths for the directories a test names, plus a private
  results directory where the command's exit code lands.

The vmlinux is extracted once from /boot/vmlinuz-* (QEMU boots an uncompressed ELF through its PVH
entry, the fastest path under TCG) and cached with a small busybox initramfs under build/vm/.

Every exit path kills QEMU: a hard timeout, an exception, and the death of this process
(PR_SET_PDEATHSIG). Usable by hand:

    python3 -m tests.vm.runner --kernel 6.12 [--share DIR]... -- CMD ARGS...
"""

from __future__ import annotations

import argparse
import ctypes
import dataclasses
import hashlib
import lzma
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import zlib
from collections.abc import Iterable, Sequence
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
CACHE = Path(os.environ.get("TRUSTDB_VM_CACHE", REPO / "build" / "vm"))
QEMU = "qemu-system-x86_64"
BUSYBOX = Path("/bin/busybox")
KERNEL_PACKAGES = {
    "6.1": "linux-image-amd64",
    "6.12": "linux-image-6.12.95+deb12-amd64",
}
# The order Debian enables them, with bpf added: the BPF LSM only runs when named here.
LSM_LIST = "lockdown,capability,landlock,yama,bpf"
# 9p, its virtio transport and virtio-pci (built in on 6.12, a module on 6.1), with dependencies.
ROOT_MODULES = ("virtio_pci", "9pnet_virtio", "9p")
# Where the decompressed kernel's ELF header sits after a compression magic.
COMPRESSION_MAGIC = {
    b"\xfd7zXZ\x00": "xz",
    b"\x28\xb5\x2f\xfd": "zstd",
    b"\x1f\x8b\x08": "gzip",
}


class VmError(Exception):
    """The VM could not be prepared or booted (missing kernel, missing qemu, bad image)."""


@dataclasses.dataclass(frozen=True, slots=True)
class GuestKernel:
    series: str
    """`6.1` or `6.12`: what tests and `make test-lsm KERNEL=` call it."""
    release: str
    """`uname -r` of the guest, e.g. `6.12.95+deb12-amd64`."""
    vmlinuz: Path
    modules: Path


@dataclasses.dataclass(frozen=True, slots=True)
class VmResult:
    returncode: int
    """The command's exit status; -1 if it never reported one (timeout, crash, panic)."""
    console: str
    """Everything the guest wrote to its serial console: kernel messages and the command's output."""
    timed_out: bool
    seconds: float


def find_kernel(series: str) -> GuestKernel:
    """The newest installed Debian kernel of one series (`6.1` matches 6.1.x, not 6.12)."""
    pattern = re.compile(rf"^vmlinuz-({re.escape(series)}\.\d+.*-amd64)$")
    found = sorted(
        (m.group(1) for p in Path("/boot").glob("vmlinuz-*") if (m := pattern.match(p.name))),
        key=lambda r: [int(x) if x.isdigit() else 0 for x in re.split(r"[.+-]", r)],
    )
    if not found:
        pkg = KERNEL_PACKAGES.get(series, f"a {series} kernel")
        raise VmError(
            f"no /boot/vmlinuz-{series}.* kernel: install {pkg} "
            "(bash packaging/install-deps.sh installs both test kernels)"
        )
    release = found[-1]
    modules = Path("/lib/modules") / release
    if not (modules / "modules.dep").exists():
        raise VmError(f"{modules}/modules.dep missing: is the kernel package fully installed?")
    return GuestKernel(series, release, Path("/boot") / f"vmlinuz-{release}", modules)


def _decompress(kind: str, data: bytes) -> bytes:
    if kind == "xz":
        return lzma.LZMADecompressor(format=lzma.FORMAT_XZ).decompress(data)
    if kind == "zstd":
        import zstandard

        return zstandard.ZstdDecompressor().decompressobj().decompress(data)
    return zlib.decompressobj(16 + zlib.MAX_WBITS).decompress(data)


def _zstd_error() -> type[Exception]:
    import zstandard

    return zstandard.ZstdError


def extract_vmlinux(vmlinuz: Path) -> bytes:
    """The uncompressed ELF kernel inside a bzImage (the kernel tree's extract-vmlinux, in Python):
    find each compression magic, decompress from there, keep the first result that is ELF."""
    blob = vmlinuz.read_bytes()
    for magic, kind in COMPRESSION_MAGIC.items():
        start = blob.find(magic)
        while start != -1:
            try:
                out = _decompress(kind, blob[start:])
            except (lzma.LZMAError, zlib.error, EOFError, _zstd_error()):  # a magic inside code
                out = b""
            if out[:4] == b"\x7fELF":
                return out
            start = blob.find(magic, start + 1)
    raise VmError(f"{vmlinuz}: found no compressed ELF kernel (xz, zstd or gzip) inside")


def cached_vmlinux(kernel: GuestKernel) -> Path:
    dest = CACHE / kernel.release / "vmlinux"
    if dest.exists() and dest.stat().st_mtime >= kernel.vmlinuz.stat().st_mtime:
        return dest
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = dest.with_suffix(".tmp")
    tmp.write_bytes(extract_vmlinux(kernel.vmlinuz))
    tmp.replace(dest)
    return dest


def module_load_order(modules: Path, names: Iterable[str]) -> list[Path]:
    """Module files for `names` and their dependencies, dependencies first. Names built into the
    kernel (modules.builtin) need nothing."""
    deps: dict[str, list[str]] = {}
    by_name: dict[str, str] = {}
    for line in (modules / "modules.dep").read_text().splitlines():
        target, _, rest = line.partition(":")
        deps[target] = rest.split()
        by_name[_module_name(target)] = target
    builtin = {_module_name(x) for x in (modules / "modules.builtin").read_text().split()}
    order: list[str] = []

    def visit(rel: str) -> None:
        if rel in order:
            return
        for d in reversed(deps[rel]):  # modules.dep lists the deepest dependency last
            visit(d)
        order.append(rel)

    for name in names:
        key = name.replace("-", "_")
        if key in by_name:
            visit(by_name[key])
        elif key not in builtin:
            raise VmError(f"kernel module {name} is neither in {modules} nor built in")
    return [modules / rel for rel in order]


def _module_name(rel: str) -> str:
    return Path(rel).name.split(".ko")[0].replace("-", "_")


def _module_bytes(path: Path) -> bytes:
    """busybox insmod takes plain ELF: undo Debian's module compression here."""
    data = path.read_bytes()
    if path.name.endswith(".xz"):
        return lzma.decompress(data)
    if path.name.endswith(".zst"):
        import zstandard

        return zstandard.ZstdDecompressor().decompressobj().decompress(data)
    return data


GUEST_TMPFS = ("/tmp", "/run", "/var/tmp", "/dev/shm")
"""Fresh tmpfs mounts in the guest (INIT_SCRIPT mounts these): host files below them are hidden
unless shared explicitly, which `run` does for the repository and the working directory."""

# PID 1 of the guest. Mounts everything, runs $RESULTS/run.sh chrooted into the host's /, writes
# its exit status to $RESULTS/rc, powers off. The settings come from $RESULTS/vm.conf.
INIT_SCRIPT = r"""#!/bin/busybox sh
B=/bin/busybox
$B mount -t proc proc /proc
$B mount -t sysfs sys /sys
$B mount -t devtmpfs dev /dev
for m in $($B cat /modules/order); do
  $B insmod /modules/$m || echo "vm-init: insmod $m failed"
done
opts=trans=virtio,version=9p2000.L,msize=512000
$B mount -t 9p -o $opts td_results /results || { echo "vm-init: no results share"; $B reboot -f; }
. /results/vm.conf
R=/newroot
$B mount -t 9p -o ro,$opts,cache=loose td_hostroot $R || { echo "vm-init: no host root"; $B reboot -f; }
$B mount -t proc proc $R/proc
$B mount -t sysfs sys $R/sys
$B mount -t devtmpfs dev $R/dev
$B mkdir -p $R/dev/pts $R/dev/shm
$B mount -t devpts devpts $R/dev/pts
for d in """ + " ".join(GUEST_TMPFS) + r"""; do $B mount -t tmpfs -o mode=1777 tmpfs $R$d; done
$B mount -t cgroup2 cgroup2 $R/sys/fs/cgroup
$B mount -t securityfs securityfs $R/sys/kernel/security
$B mount -t bpf bpf $R/sys/fs/bpf
$B mount -t tracefs tracefs $R/sys/kernel/tracing
for s in $TD_SHARES; do
  tag=${s%%=*}; dir=${s#*=}
  $B mkdir -p $R$dir && $B mount -t 9p -o $opts $tag $R$dir || echo "vm-init: share $dir failed"
done
$B mkdir -p $R$TD_RESULTS && $B mount --bind /results $R$TD_RESULTS
$B hostname trustdb-vm
$B ip link set lo up 2>/dev/null
if [ -d /results/units ]; then
  # systemd as PID 1 (run(systemd=True)): the test's units go to /run/systemd/system, and
  # td-test.service runs the command, writes the rc and powers off.
  $B mkdir -p $R/run/systemd/system && $B cp -a /results/units/. $R/run/systemd/system/
  echo "vm-init: booting systemd"
  exec $B chroot $R /lib/systemd/systemd --unit=td-test.target
fi
echo "vm-init: running command"
$B chroot $R /usr/bin/env -i PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin \
  HOME=/root TERM=dumb LANG=C.UTF-8 /bin/sh -c "cd $TD_CWD && . $TD_RESULTS/run.sh" </dev/console
echo $? > /results/rc
$B sync
$B umount -l $R$TD_RESULTS 2>/dev/null
$B umount /results
$B reboot -f
"""


SYSTEMD_TEST_UNITS: dict[str, str | None] = {
    "td-test.target": """[Unit]
Description=trustdb VM test
Requires=td-test.service
After=td-test.service
""",
    "td-test.service": """[Unit]
Description=trustdb VM test command
DefaultDependencies=no
Wants=sysinit.target
After=sysinit.target
SuccessAction=poweroff-force
FailureAction=poweroff-force
[Service]
Type=oneshot
Environment=PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin HOME=/root LANG=C.UTF-8
# run.sh ends in `exec`: a subshell runs it, so that the status is still written.
ExecStart=/bin/sh -c '(cd {cwd} && . {results}/run.sh); echo $$? > {results}/rc'
StandardOutput=tty
StandardError=tty
TTYPath=/dev/console
TimeoutStartSec=infinity
""",
    # Hangs on the read-only root under TCG (it holds sysinit.target back): masked.
    "systemd-update-utmp.service": None,
}
"""Units for run(systemd=True), formatted with the results and working directories."""


class _Cpio:
    """A cpio archive in the kernel's `newc` format, in memory."""

    def __init__(self) -> None:
        self._parts: list[bytes] = []
        self._ino = 1

    def _entry(
        self, name: str, mode: int, data: bytes = b"", rdev: tuple[int, int] = (0, 0)
    ) -> None:
        fields = [self._ino, mode, 0, 0, 1, 0, len(data), 0, 0, rdev[0], rdev[1], len(name) + 1, 0]
        self._ino += 1
        head = b"070701" + b"".join(b"%08X" % f for f in fields) + name.encode() + b"\0"
        self._parts.append(head + b"\0" * (-len(head) % 4))
        self._parts.append(data + b"\0" * (-len(data) % 4))

    def dir(self, name: str) -> None:
        self._entry(name, 0o040755)

    def file(self, name: str, data: bytes, perm: int = 0o644) -> None:
        self._entry(name, 0o100000 | perm, data)

    def symlink(self, name: str, target: str) -> None:
        self._entry(name, 0o120777, target.encode())

    def chardev(self, name: str, major: int, minor: int) -> None:
        self._entry(name, 0o020600, rdev=(major, minor))

    def finish(self) -> bytes:
        self._entry("TRAILER!!!", 0)
        out = b"".join(self._parts)
        return out + b"\0" * (-len(out) % 512)


def build_initramfs(kernel: GuestKernel) -> bytes:
    archive = _Cpio()
    for d in ("bin", "dev", "proc", "sys", "newroot", "results", "modules"):
        archive.dir(d)
    archive.chardev("dev/console", 5, 1)  # init's stdio before devtmpfs is mounted
    archive.file("bin/busybox", BUSYBOX.read_bytes(), 0o755)
    archive.symlink("bin/sh", "busybox")
    archive.file("init", INIT_SCRIPT.encode(), 0o755)
    names = []
    for i, path in enumerate(module_load_order(kernel.modules, ROOT_MODULES)):
        name = f"{i:02d}-{_module_name(path.name)}.ko"
        archive.file(f"modules/{name}", _module_bytes(path))
        names.append(name)
    archive.file("modules/order", ("\n".join(names) + "\n").encode())
    return archive.finish()


def cached_initramfs(kernel: GuestKernel) -> Path:
    if not BUSYBOX.exists():
        raise VmError(f"{BUSYBOX} missing: install busybox-static")
    tag = hashlib.sha256(
        INIT_SCRIPT.encode() + str(BUSYBOX.stat().st_mtime_ns).encode() + kernel.release.encode()
    ).hexdigest()[:12]
    dest = CACHE / kernel.release / f"initramfs-{tag}.cpio"
    if not dest.exists():
        dest.parent.mkdir(parents=True, exist_ok=True)
        tmp = dest.with_suffix(".tmp")
        tmp.write_bytes(build_initramfs(kernel))
        tmp.replace(dest)
    return dest


def _die_with_parent() -> None:
    """In the QEMU child: get SIGKILL when the process that started it dies, however it dies."""
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    os.setsid()


ICOUNT_SHIFT = 3
"""With `icount`, each guest instruction is 2**3 = 8 ns of guest time: about as slow as TCG
runs here, so the guests' timeouts (written for real time) keep their meaning (at 1 ns per
instruction the guest's clock ran ~4x ahead of the host's and they fired). An idle guest sleeps
in real time (QEMU's default `sleep=on`; with `sleep=off` every wait for the host's files
jumped the clock ahead): I/O waits stay real time, CPU-bound loops are counted."""


def qemu_command(
    kernel: GuestKernel,
    results: Path,
    shares: Sequence[Path],
    *,
    memory: str,
    cpus: int,
    lsm: str = LSM_LIST,
    icount: bool = False,
) -> list[str]:
    if shutil.which(QEMU) is None:
        raise VmError(f"{QEMU} not found: install qemu-system-x86 (packaging/apt-packages.txt)")
    cmdline = " ".join(
        [
            "console=ttyS0",
            f"lsm={lsm}",
            "rdinit=/init",
            "panic=-1",
            "oops=panic",
            "quiet",
            "loglevel=4",
            "mitigations=off",  # TCG emulates every mitigation slowly; nothing here relies on them
            "random.trust_cpu=on",
            "8250.nr_uarts=1",
        ]
    )
    fs = "security_model=none,multidevs=remap"
    cmd = [
        QEMU,
        "-accel", "tcg",
        "-cpu", "max",
        "-smp", str(cpus),
        "-m", memory,
        "-nodefaults", "-no-user-config", "-no-reboot",
        "-display", "none",
        "-serial", "stdio",
        "-monitor", "none",
        "-kernel", str(cached_vmlinux(kernel)),
        "-initrd", str(cached_initramfs(kernel)),
        "-append", cmdline,
        "-device", "virtio-rng-pci",
        "-virtfs", f"local,path=/,mount_tag=td_hostroot,readonly=on,{fs}",
        "-virtfs", f"local,path={results},mount_tag=td_results,{fs}",
    ]  # fmt: skip
    for i, share in enumerate(shares):
        cmd += ["-virtfs", f"local,path={share},mount_tag=td_share{i},{fs}"]
    if icount:
        # The guest's clock counts instructions instead of following the host's: a timing
        # inside the guest no longer depends on how busy the host is.
        cmd += ["-icount", f"shift={ICOUNT_SHIFT}"]
    return cmd


def _check_path(p: Path) -> str:
    s = str(p)
    if not p.is_absolute() or re.search(r"[\s=\"'$`\\]", s):
        raise VmError(f"{s}: VM shares need absolute paths without spaces, quotes or '='")
    return s


def run(
    series: str,
    command: Sequence[str],
    *,
    shares: Sequence[Path] = (),
    cwd: Path = REPO,
    env: dict[str, str] | None = None,
    timeout: float = 600.0,
    memory: str = "2G",
    cpus: int = 2,
    echo: bool = False,
    lsm: str = LSM_LIST,
    systemd: bool = False,
    icount: bool = False,
) -> VmResult:
    """Boot kernel `series`, run `command` (argv) as root in the guest, and return its status.

    `shares` are host directories the guest may write (mounted at the same paths); everything
    else of the host is visible read-only. `echo` copies the console to stdout as it comes.
    `lsm` is the kernel's `lsm=` list (without `bpf`, BPF LSM programs must be refused).
    `systemd`: boot the host's systemd as PID 1 (read-only root, the tmpfs mounts above) and
    run `command` as the oneshot unit td-test.service (SYSTEMD_TEST_UNITS).
    """
    kernel = find_kernel(series)
    shares = [Path(os.path.realpath(s)) for s in shares]
    # A checkout under /tmp (CI clones anywhere) would vanish under the guest's tmpfs.
    for d in (Path(os.path.realpath(REPO)), Path(os.path.realpath(cwd))):
        if _under(d, GUEST_TMPFS) and not any(d.is_relative_to(s) for s in shares):
            shares.append(d)
    results = Path(tempfile.mkdtemp(prefix="trustdb-vm-"))
    try:
        exports = " ".join(f"td_share{i}={_check_path(s)}" for i, s in enumerate(shares))
        (results / "vm.conf").write_text(
            f"TD_SHARES='{exports}'\nTD_RESULTS='{_check_path(results)}'\n"
            f"TD_CWD='{_check_path(cwd)}'\n"
        )
        exports_env = "".join(f"export {k}={shlex.quote(v)}\n" for k, v in (env or {}).items())
        (results / "run.sh").write_text(exports_env + "exec " + shlex.join(command) + "\n")
        if systemd:
            units = results / "units"
            units.mkdir()
            for name, text in SYSTEMD_TEST_UNITS.items():
                if text is None:
                    (units / name).symlink_to("/dev/null")  # masked
                else:
                    (units / name).write_text(text.format(results=results, cwd=cwd))
        cmd = qemu_command(kernel, results, shares, memory=memory, cpus=cpus, lsm=lsm,
                           icount=icount)
        return _boot(cmd, results, timeout, echo)
    finally:
        shutil.rmtree(results, ignore_errors=True)


def _under(path: Path, tops: Sequence[str]) -> bool:
    return any(path.is_relative_to(t) for t in tops)


def _boot(cmd: list[str], results: Path, timeout: float, echo: bool) -> VmResult:
    start = time.monotonic()
    console: list[str] = []
    proc = subprocess.Popen(
        cmd,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        preexec_fn=_die_with_parent,  # noqa: PLW1509 - prctl must run in the child
    )
    assert proc.stdout is not None
    stream = proc.stdout

    def pump() -> None:
        for raw in iter(stream.readline, b""):
            line = raw.decode(errors="replace").replace("\r", "")
            console.append(line)
            if echo:
                sys.stdout.write(line)
                sys.stdout.flush()

    reader = threading.Thread(target=pump, daemon=True)
    reader.start()
    timed_out = False
    try:
        proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        timed_out = True
    finally:
        if proc.poll() is None:  # timeout, KeyboardInterrupt, anything: never leave QEMU behind
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        reader.join(timeout=5)
        stream.close()
    rc_file = results / "rc"
    text = rc_file.read_text().strip() if rc_file.exists() else ""
    return VmResult(
        returncode=int(text) if text.lstrip("-").isdigit() else -1,
        console="".join(console),
        timed_out=timed_out,
        seconds=time.monotonic() - start,
    )


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python3 -m tests.vm.runner",
        description="Run one command as root in a stock Debian kernel under QEMU (BPF LSM on).",
    )
    parser.add_argument("--kernel", default="6.12", help="kernel series: 6.1 or 6.12")
    parser.add_argument("--share", action="append", default=[], type=Path,
                        help="host directory the guest may write (repeatable)")  # fmt: skip
    parser.add_argument("--timeout", type=float, default=600.0, help="hard limit, seconds")
    parser.add_argument("--icount", action="store_true",
                        help="guest clock counts instructions (timings independent of host load)")
    parser.add_argument("command", nargs="+", help="command and arguments (after --)")
    args = parser.parse_args(argv)
    try:
        result = run(args.kernel, args.command, shares=args.share, cwd=Path.cwd(),
                     timeout=args.timeout, echo=True, icount=args.icount)  # fmt: skip
    except VmError as e:
        print(f"vm: {e}", file=sys.stderr)
        return 2
    why = "timed out" if result.timed_out else f"exit {result.returncode}"
    print(f"vm: {args.kernel}: {why} after {result.seconds:.1f}s", file=sys.stderr)
    return result.returncode if result.returncode >= 0 else 1


if __name__ == "__main__":
    sys.exit(main())
