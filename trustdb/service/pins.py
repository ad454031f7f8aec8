"""The service's state on bpffs: what keeps the kernel deciding when the daemon is gone.

Layout (one *instance* per loaded BPF object; normally exactly one):

    /sys/fs/bpf/trustdb/<instance>/links/<program>   pinned BPF links: the programs stay attached
    /sys/fs/bpf/trustdb/<instance>/maps/<name>       trusted_inodes, events, confined
    /run/trustdb/pins.state                          PinRecord (JSON): which instance is current,
                                                     its backend, mode, object hash, and the DB
                                                     generation its map mirrors

bpffs holds only BPF objects, so the record lives in the runtime directory; both vanish at
reboot together. A daemon that dies for any reason (crash, kill -9, OOM kill, upgrade) leaves
the links attached and the map as it last was: execs of first-seen files are then denied (the
first-seen pre-warm died with it), never allowed. The next daemon `adopt`s the instance when
backend, mode and object are the same, and only `unpin_all` (`trustdb service stop`) ends
enforcement. A new instance is pinned *before* the old one is removed, so switching mode or
upgrading the BPF object has no gap either.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from trustdb.libbpf import BpfMap, LibbpfError, open_pinned_map
from trustdb.state import STATE_DIR

PIN_DIR = Path(os.environ.get("TRUSTDB_PIN_DIR", "/sys/fs/bpf/trustdb"))
RECORD_NAME = "pins.state"
BPF_FS_MAGIC = 0xCAFE4A11


class PinError(Exception):
    """The pinned state could not be made, read or removed (one line)."""


@dataclass(frozen=True, slots=True)
class PinRecord:
    """What the running (or last) daemon pinned, and what its map mirrors."""

    instance: str
    backend: str
    mode: str
    object_sha256: str
    generation: int
    """The database generation the pinned map matches (updated after every sync)."""
    pinned_at: float
    daemon_pid: int = 0
    """The daemon that last owned the pins (may be gone)."""


def object_sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@dataclass
class PinStore:
    """Reads and writes the pins under `root` and their record under `run_dir`."""

    root: Path = PIN_DIR
    run_dir: Path = STATE_DIR

    @property
    def record_path(self) -> Path:
        return self.run_dir / RECORD_NAME

    # --- the record

    def current(self) -> PinRecord | None:
        """The record of the pinned instance, if its record and its pins are both there."""
        try:
            record = PinRecord(**json.loads(self.record_path.read_text()))
        except (OSError, ValueError, TypeError):
            return None
        links = self.instance_dir(record.instance) / "links"
        if not links.is_dir() or not any(links.iterdir()):
            return None
        return record

    def write(self, record: PinRecord) -> None:
        self.run_dir.mkdir(mode=0o755, parents=True, exist_ok=True)
        tmp = self.run_dir / f".{RECORD_NAME}.{os.getpid()}"
        tmp.write_text(json.dumps(asdict(record)))
        os.replace(tmp, self.record_path)

    def new_instance(self) -> tuple[str, Path]:
        """A fresh, empty instance directory on bpffs."""
        self._check_bpffs()
        name = f"i{time.time_ns():x}"
        path = self.instance_dir(name)
        try:
            path.mkdir(parents=True)
        except OSError as e:
            raise PinError(f"cannot create {path}: {e.strerror}") from e
        return name, path

    def instance_dir(self, instance: str) -> Path:
        return self.root / instance

    def instances(self) -> list[str]:
        try:
            return sorted(p.name for p in self.root.iterdir() if p.is_dir())
        except OSError:
            return []

    # --- adopting

    def open_maps(self, record: PinRecord, names: tuple[str, ...]) -> dict[str, BpfMap]:
        """New fds for the pinned maps of `record`'s instance (the caller closes them)."""
        maps: dict[str, BpfMap] = {}
        try:
            for name in names:
                maps[name] = open_pinned_map(self.instance_dir(record.instance) / "maps" / name)
        except LibbpfError as e:
            for m in maps.values():
                os.close(m.fd)
            raise PinError(f"cannot adopt the pinned {record.backend} engine: {e}") from e
        return maps

    # --- removing

    def remove_instance(self, instance: str) -> None:
        """Unpin one instance: once no process holds their fds, its programs detach."""
        path = self.instance_dir(instance)
        # Links first: the programs stop deciding before their maps go.
        for sub in ("links", "maps"):
            d = path / sub
            if d.is_dir():
                for p in d.iterdir():
                    with contextlib.suppress(FileNotFoundError):
                        p.unlink()
                with contextlib.suppress(FileNotFoundError):
                    d.rmdir()
        with contextlib.suppress(FileNotFoundError):
            path.rmdir()

    def remove_others(self, keep: str) -> list[str]:
        """Unpin every instance but `keep` (an older object, another mode, orphans)."""
        gone = [i for i in self.instances() if i != keep]
        for i in gone:
            self.remove_instance(i)
        return gone

    def unpin_all(self) -> list[str]:
        """End system-wide enforcement (`trustdb service stop`): every pin and the record."""
        gone = self.instances()
        for i in gone:
            self.remove_instance(i)
        with contextlib.suppress(FileNotFoundError):
            self.record_path.unlink()
        if self.root.is_dir() and not any(self.root.iterdir()):
            with contextlib.suppress(OSError):
                self.root.rmdir()
        return gone

    def _check_bpffs(self) -> None:
        """Pins need bpffs; refuse to scatter files over a plain directory."""
        probe = self.root if self.root.exists() else self.root.parent
        try:
            from trustdb.mirror import fs_magic

            magic = fs_magic(str(probe))
        except OSError as e:
            raise PinError(f"{probe}: {e.strerror}") from e
        if magic != BPF_FS_MAGIC:
            raise PinError(f"{probe} is not a bpf filesystem (mount -t bpf bpf /sys/fs/bpf)")
        self.root.mkdir(mode=0o700, exist_ok=True)

