"""What every BPF backend shares: find its object file, load it with the engine's configuration
(`struct td_config` in .rodata, map sizes), attach, and expose the maps of bpf/common.bpf.h.

A backend subclass names its object file and its identity; everything else is here, so the
`lsm` and `tracepoint` backends differ only in their BPF programs.
"""

from __future__ import annotations

import ctypes
import errno
import os
import struct
from collections.abc import Sequence
from pathlib import Path

from trustdb import corecache
from trustdb.abi import BackendId, CConfig, CFirstSeenGroup, CInodeKey, CTask, Mode, ProgramFlag
from trustdb.backends.interface import (
    DEFAULT_MAX_ENTRIES,
    Backend,
    BackendError,
    EngineConfig,
    KeySink,
    MapFullError,
    Probe,
    Scope,
)
from trustdb.libbpf import BpfMap, BpfObject, LibbpfError
from trustdb.model import InodeKey

_TRUSTED = b"\x01"
_KEY_BYTES = struct.Struct("=QQqI4x")
"""`struct td_inode_key` (abi.CInodeKey) packed straight from an InodeKey tuple: the mirror
inserts 137k keys at start-up, and a ctypes object per key cost more than the bpf() call."""
_PIDFD_THREAD = os.O_EXCL  # pidfd of one thread (6.9+)


PACKAGE_BPF_DIR = Path(__file__).resolve().parents[1] / "bpf"
"""Where the wheel and the packages put the objects (package data, built at wheel build time)."""


def object_dir() -> Path:
    """Where the built BPF objects are: $TRUSTDB_BPF_DIR (tests, a build elsewhere), the source
    tree's build/bpf (after `make bpf`), the package's own trustdb/bpf (wheel, .deb, .rpm), or
    /usr/lib/trustdb/bpf (packaging/install.sh)."""
    env = os.environ.get("TRUSTDB_BPF_DIR")
    if env:
        return Path(env)
    tree = Path(__file__).resolve().parents[2] / "build" / "bpf"
    if tree.is_dir():
        return tree
    if PACKAGE_BPF_DIR.is_dir():
        return PACKAGE_BPF_DIR
    return Path("/usr/lib/trustdb/bpf")


class MapKeySink:
    """The `trusted_inodes` map as the mirror's KeySink (batched inserts)."""

    def __init__(self, m: BpfMap) -> None:
        self._map = m

    def add(self, keys: Sequence[InodeKey]) -> None:
        if not keys:
            return
        try:
            pack = _KEY_BYTES.pack
            self._map.update_batch([pack(*k) for k in keys], [_TRUSTED] * len(keys))
        except LibbpfError as e:
            if e.errno == errno.E2BIG:
                raise MapFullError(
                    "the kernel's trusted-inode map is full (raise max_entries)", e.done
                ) from e
            raise BackendError(f"cannot insert trusted inode keys: {e.strerror}") from e

    def remove(self, keys: Sequence[InodeKey]) -> None:
        # One by one: the kernel's batch delete stops at the first missing key.
        for k in keys:
            self._map.delete(bytes(CInodeKey.from_key(k)))

    def __contains__(self, key: InodeKey) -> bool:
        return self._map.lookup(bytes(CInodeKey.from_key(key))) is not None

    def __len__(self) -> int:
        return len(self._map.keys_batched())

    def keys(self) -> list[InodeKey]:
        """Every key in the map, 8192 per bpf() call (the adopt road reads its pin so)."""
        raw = b"".join(self._map.keys_batched())
        return [InodeKey(*k) for k in _KEY_BYTES.iter_unpack(raw)]


class BpfBackend(Backend):
    """A backend made of one BPF object built from bpf/<object_name>."""

    object_name: str
    backend_id: BackendId
    probe_programs: tuple[str, ...] = ()
    """Programs whose attach the probe also tries (empty: loading is proof enough)."""

    def __init__(self, *, objdir: Path | None = None) -> None:
        self._objdir = objdir
        self._obj: BpfObject | None = None
        self._sink: MapKeySink | None = None
        self._events_fd = -1
        self._attached = False
        self._scope_path = ""

    @property
    def probe_is_load(self) -> bool:  # type: ignore[override]
        return not self.probe_programs

    @property
    def object_path(self) -> Path:
        return (self._objdir or object_dir()) / self.object_name

    def _open(self, config: EngineConfig, max_entries: int, *, explain: bool = True) -> BpfObject:
        path = self.object_path
        if not path.is_file():
            raise BackendError(
                f"{self.name}: BPF object {path} not found (reinstall trustdb: apt install "
                "--reinstall trustdb, or pip install --force-reinstall trustdb; in a source "
                "tree: make bpf; or set TRUSTDB_BPF_DIR)"
            )
        scope = config.scope
        cfg = CConfig(
            scope_cgroup_id=scope.cgroup_id,
            scope_cgroup_level=scope.cgroup_level,
            supervisor_tgid=config.supervisor_tgid,
            mode=int(config.mode),
            backend=int(self.backend_id),
            log_allows=int(config.log_allows),
        )

        def configure(obj: BpfObject) -> None:
            obj.set_rodata("td_cfg", bytes(cfg))
            obj.set_max_entries("trusted_inodes", max_entries)
            obj.set_max_entries("events", config.events_bytes)

        # Scoped engines (`run`) relocate against remembered CO-RE targets when there are
        # some (trustdb.corecache); the system-wide service never does.
        core_key = None if scope.system_wide else corecache.current_key(path)
        if core_key is not None:
            with corecache.recalled(core_key) as core_btf:
                if core_btf is not None:
                    obj = BpfObject(path, core_btf=core_btf)
                    try:
                        configure(obj)
                        obj.load(explain=False)
                        return obj
                    except LibbpfError:
                        obj.close()
                        corecache.forget(core_key)  # then the slow way, which says why
                    except BaseException:
                        obj.close()
                        raise
        obj = BpfObject(path)
        try:
            configure(obj)
            obj.load(explain=explain)
        except BaseException:
            obj.close()
            raise
        if core_key is not None:
            corecache.note_slow_load(obj, core_key, configure)
        return obj

    def probe(self) -> Probe:
        # Audit mode, a scope no task is in (cgroup id 1 at level 99 never matches), tiny maps:
        # nothing can be denied even if an attach succeeds.
        config = EngineConfig(
            mode=Mode.AUDIT, scope=Scope(cgroup_id=1, cgroup_level=99), events_bytes=4096
        )
        try:
            obj = self._open(config, 16, explain=False)  # the reason is its first line
        except (BackendError, LibbpfError) as e:
            return Probe(False, f"{self.name}: {_first_line(e)}")
        try:
            for prog in self.probe_programs:
                obj.attach(prog)
        except LibbpfError as e:
            return Probe(False, f"{self.name}: {_first_line(e)}")
        finally:
            obj.close()
        return Probe(True, f"{self.name}: loaded {self.object_name}")

    def load(self, config: EngineConfig) -> None:
        if self._obj is not None:
            raise BackendError(f"{self.name}: already loaded")
        if config.scope.system_wide is False and config.scope.cgroup_level <= 0:
            raise BackendError(f"{self.name}: scope cgroup {config.scope.cgroup_id} has no level")
        self._scope_path = config.scope.cgroup_path
        try:
            self._obj = self._open(config, config.max_entries or DEFAULT_MAX_ENTRIES)
            self._sink = MapKeySink(self._obj.map("trusted_inodes"))
            self._events_fd = self._obj.map("events").fd
        except LibbpfError as e:
            self.detach()
            raise BackendError(f"{self.name}: {e}") from e

    def attach(self) -> None:
        if self._obj is None:
            raise BackendError(f"{self.name}: attach before load")
        try:
            self._obj.attach_all()
        except LibbpfError as e:
            raise BackendError(f"{self.name}: {e}") from e
        self._attached = True
        if self._scope_path:
            self._mark_scope_tasks(Path(self._scope_path))

    def _mark_scope_tasks(self, cgroup: Path) -> None:
        """Mark every thread already in the scope (the hot paths look at marks only; from now
        on the fork, exec and cgroup-attach programs mark newcomers themselves)."""
        for threads in cgroup.rglob("cgroup.threads"):
            try:
                tids = [int(t) for t in threads.read_text().split()]
            except OSError:
                continue
            for tid in tids:
                try:
                    fd = os.pidfd_open(tid, _PIDFD_THREAD)
                except OSError:
                    try:  # kernels before 6.9 open pidfds of thread-group leaders only
                        fd = os.pidfd_open(tid)
                    except OSError:
                        continue  # exited, or a non-leader thread on an old kernel
                try:
                    self.confine(fd)
                except BackendError:
                    pass  # exited in between
                finally:
                    os.close(fd)

    def detach(self) -> None:
        obj, self._obj = self._obj, None
        self._sink = None
        self._events_fd = -1
        self._attached = False
        if obj is not None:
            obj.close()

    PINNED_MAPS = ("trusted_inodes", "events", "confined", "first_seen_group",
                   "mode_uids", "mode_cgroups")
    """The maps a later process needs to adopt a pinned engine (trustdb.service.pins)."""

    def pin(self, directory: Path) -> None:
        """Pin the links (directory/links/<program>) and maps (directory/maps/<name>) on bpffs,
        so that the programs keep deciding with the last map when this process dies."""
        if self._obj is None or not self._attached:
            raise BackendError(f"{self.name}: pin before attach")
        try:
            for sub in ("links", "maps"):
                (directory / sub).mkdir(parents=True, exist_ok=True)
            for m in self.PINNED_MAPS:
                self._obj.pin_map(m, directory / "maps" / m)
            self._obj.pin_links(directory / "links")
        except (LibbpfError, OSError) as e:
            raise BackendError(f"{self.name}: cannot pin under {directory}: {e}") from e

    def map(self, name: str) -> BpfMap:
        """One of the object's maps (its fd is the object's: do not close it)."""
        if self._obj is None:
            raise BackendError(f"{self.name}: not loaded")
        try:
            return self._obj.map(name)
        except LibbpfError as e:
            raise BackendError(f"{self.name}: map {name}: {e}") from e

    @property
    def attached(self) -> bool:
        return self._attached

    @property
    def trusted_inodes(self) -> KeySink:
        if self._sink is None:
            raise BackendError(f"{self.name}: not loaded")
        return self._sink

    @property
    def events_fd(self) -> int:
        if self._events_fd < 0:
            raise BackendError(f"{self.name}: not loaded")
        return self._events_fd

    def confine(self, pidfd: int) -> None:
        if self._obj is None:
            raise BackendError(f"{self.name}: confine before load")
        try:
            self._obj.map("confined").update(bytes(ctypes.c_int(pidfd)), bytes(CTask(confined=1)))
        except LibbpfError as e:
            raise BackendError(f"{self.name}: cannot confine pidfd {pidfd}: {e.strerror}") from e

    def set_program_flags(self, items: Sequence[tuple[InodeKey, int]]) -> None:
        """Give programs, by the inode key of their executable, ProgramFlag bits: JIT (may use
        anonymous executable memory), INTERPRETER (lsm: may open script files only if they are
        trusted). A flag of 0 removes the program. Call after load(); takes effect at once."""
        if self._obj is None:
            raise BackendError(f"{self.name}: set_program_flags before load")
        m = self._obj.map("program_flags")
        known = int(ProgramFlag.JIT | ProgramFlag.INTERPRETER)
        for key, flags in items:
            if flags & ~known:
                raise BackendError(f"{self.name}: unknown program flags {flags:#x}")
            ckey = bytes(CInodeKey.from_key(key))
            try:
                if flags:
                    m.update(ckey, int(flags).to_bytes(4, "little"))
                else:
                    m.delete(ckey)
            except LibbpfError as e:
                raise BackendError(f"{self.name}: cannot set program flags: {e.strerror}") from e

    def vouch_by(self, tgid: int, fd: int) -> bool:
        """Let the ignore marks of the fanotify group at fd `fd` of process `tgid` (the
        first-seen handler) vouch for inodes whose key moved without their content changing
        (bpf/vouch.bpf.h, td_vouched_by_handler). Returns whether the group was found.
        `tgid` 0 forgets the group (call it when the handler stops)."""
        if self._obj is None:
            raise BackendError(f"{self.name}: not loaded")
        m = self._obj.map("first_seen_group")
        zero = bytes(4)
        try:
            m.update(zero, bytes(CFirstSeenGroup(tgid, max(fd, 0), 0)))
            if tgid == 0:
                return False  # forgotten: the group's memory may belong to another one later
            self._obj.run_iter("find_first_seen_group")
            got = m.lookup(zero)
        except LibbpfError as e:
            raise BackendError(f"{self.name}: cannot find the first-seen group: {e}") from e
        return got is not None and CFirstSeenGroup.from_buffer_copy(got).group != 0

    def is_confined(self, pidfd: int) -> bool:
        """Whether the task behind `pidfd` carries the confinement mark."""
        if self._obj is None:
            raise BackendError(f"{self.name}: not loaded")
        v = self._obj.map("confined").lookup(bytes(ctypes.c_int(pidfd)))
        return v is not None and v[0] == 1


def _first_line(e: BaseException) -> str:
    return str(e).splitlines()[0] if str(e) else type(e).__name__
