"""Issue 8's routes to untrusted code, each attacked for real on the tracepoint backend (6.18).

Every attack runs confined (must die by SIGKILL before the code runs, with a named reason) and,
where it proves the attack is real, unconfined (the code runs). The programs are the guest
suite's own (tests/vm/tdprobe.c, tests/vm/tdinterp.c), built here with gcc: the lsm backend
meets the same attacks in tests/vm/guest_lsm.py.
"""

from __future__ import annotations

import mmap
import os
import shutil
import subprocess
import sys
import sysconfig
import time
from pathlib import Path

import pytest

from tests.engine.conftest import Confined, closure
from tests.engine.route_cases import SELF_WRITTEN_CODE, case_id
from tests.engine.test_tracepoint import KILLED, Events, _b, _denials, _describe, events
from trustdb.abi import Hook, ProgramFlag, Reason, Verdict
from trustdb.model import InodeKey

pytestmark = [pytest.mark.root, pytest.mark.bpf]
__all__ = ["events"]  # the fixture, shared with test_tracepoint

VM = Path(__file__).resolve().parents[1] / "vm"
SHELLCODE_PY = """
import ctypes, mmap
m = mmap.mmap(-1, 4096, prot=mmap.PROT_READ | mmap.PROT_WRITE | mmap.PROT_EXEC)
m.write(bytes([0xb8, 0x2a, 0, 0, 0, 0xc3]))  # mov eax, 42; ret
addr = ctypes.addressof(ctypes.c_char.from_buffer(m))
print("ran", ctypes.CFUNCTYPE(ctypes.c_int)(addr)())
"""
CALLBACK_PY = """
import ctypes
libc = ctypes.CDLL("libc.so.6")
CMP = ctypes.CFUNCTYPE(ctypes.c_int, ctypes.POINTER(ctypes.c_int), ctypes.POINTER(ctypes.c_int))
a = (ctypes.c_int * 3)(3, 1, 2)
libc.qsort(a, 3, ctypes.sizeof(ctypes.c_int), CMP(lambda x, y: x[0] - y[0]))
print(list(a))
"""


def _cc(out: Path, src: Path, *flags: str) -> Path:
    subprocess.run(["gcc", "-O1", "-Wall", "-o", str(out), str(src), *flags], check=True)
    return out


@pytest.fixture(scope="session")
def bins(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    d = tmp_path_factory.mktemp("td-routes")
    main = d / "main.c"
    main.write_text("int main(void) { return 0; }\n")
    interp_exec = _cc(d / "interp-exec", VM / "tdinterp.c", "-nostdlib", "-static", "-no-pie")
    interp_gap = _cc(
        d / "interp-gap", VM / "tdinterp.c", "-nostdlib", "-static-pie", "-fPIE",
        "-Wl,-z,max-page-size=0x200000", "-Wl,-z,separate-code",
    )  # fmt: skip
    return {
        "probe": _cc(d / "tdprobe", VM / "tdprobe.c"),
        "other": _cc(d / "other", VM / "tdprobe.c", '-DVARIANT="untrusted"'),
        "interp-exec": interp_exec,
        "interp-gap": interp_gap,
        "uses-interp-exec": _cc(d / "uses-exec", main, f"-Wl,--dynamic-linker={interp_exec}"),
        "uses-interp-gap": _cc(d / "uses-gap", main, f"-Wl,--dynamic-linker={interp_gap}"),
        "execstack": _cc(d / "execstack", VM / "tdprobe.c", "-z", "execstack"),
    }


def _trust_probe(c: Confined, bins: dict[str, Path]) -> None:
    c.trust(closure([str(bins["probe"]), "/bin/true"]))


def _only_denial(events: Events) -> tuple[Hook, Reason, bytes]:
    denied = _denials(events.drain())
    assert len(denied) == 1, [_describe(e) for e in denied]
    e = denied[0]
    assert e.verdict == Verdict.DENY
    return Hook(e.hook), Reason(e.reason), e.path


# ---- route 1: a stale address-search record ---------------------------------------------------


def test_stale_search_record_then_exec_mapping_at_hint(
    enforce: Confined, events: Events, bins: dict[str, Path]
) -> None:
    """mremap(MREMAP_MAYMOVE) leaves a vm_unmapped_area record; an mmap(PROT_EXEC) of an
    untrusted file at a free hint address makes no search of its own. Only this call's own
    record may be used: the check finds the new mapping at the hint and denies it."""
    _trust_probe(enforce, bins)
    argv = [str(bins["probe"]), "stale", str(bins["other"])]
    r = enforce.run(argv)
    assert r.returncode == KILLED and "mapped" not in r.stdout, r
    assert _only_denial(events) == (Hook.MMAP, Reason.UNTRUSTED, _b(bins["other"]))
    assert enforce.run(argv, confined=False).stdout == "mapped at the hint\n"


# ---- route 2: the ELF interpreter, wherever it lies --------------------------------------------


@pytest.mark.parametrize("kind", ["interp-exec", "interp-gap"])
def test_untrusted_interpreter_anywhere_in_the_image(
    enforce: Confined, events: Events, bins: dict[str, Path], kind: str
) -> None:
    """PT_INTERP names an untrusted interpreter that is ET_EXEC (fixed address, AT_BASE 0) or a
    static PIE whose segments leave holes: every executable mapping of the image is judged."""
    prog = bins[f"uses-{kind}"]
    enforce.trust(closure(["/bin/true"]) + [str(prog)])
    if enforce.run([str(prog)], confined=False).stdout != "interpreter ran\n":
        assert kind == "interp-exec"  # 6.1 cannot start an ET_EXEC interpreter at all
        pytest.skip("this kernel cannot start an ET_EXEC ELF interpreter: no route to close")
    r = enforce.run([str(prog)])
    assert r.returncode == KILLED and "interpreter ran" not in r.stdout, r
    assert _only_denial(events) == (Hook.EXEC, Reason.UNTRUSTED, _b(bins[kind]))
    enforce.trust([bins[kind]])
    assert enforce.run([str(prog)]).stdout == "interpreter ran\n"


# ---- route 3: writable and executable at once, through a file ----------------------------------


def _copy(src: Path, dst: Path) -> Path:
    shutil.copy(src, dst)
    time.sleep(0.02)  # past the ctime tick on coarse-ctime kernels
    return dst


def test_exec_mapping_of_trusted_file_with_a_writer_open(
    enforce: Confined, events: Events, bins: dict[str, Path], tmp_path: Path
) -> None:
    """A trusted file that someone holds open for writing can change under the check (and
    while it runs): an executable mapping of it is denied until the writer is gone."""
    _trust_probe(enforce, bins)
    lib = _copy(bins["other"], tmp_path / "lib")
    enforce.trust([lib])
    argv = [str(bins["probe"]), "mmap", str(lib)]
    with open(lib, "r+b"):
        r = enforce.run(argv)
        assert r.returncode == KILLED and "ok" not in r.stdout, r
        assert _only_denial(events) == (Hook.MMAP, Reason.WRITABLE, _b(lib))
    assert enforce.run(argv).stdout == "ok\n"


def test_exec_mapping_of_file_mapped_shared_writable(
    enforce: Confined, events: Events, bins: dict[str, Path], tmp_path: Path
) -> None:
    """Stores through a MAP_SHARED writable mapping never move ctime: while one exists (even
    with its fd closed), the file is not mapped executable, and it is not exec'd either."""
    _trust_probe(enforce, bins)
    lib = _copy(bins["other"], tmp_path / "lib")
    enforce.trust([lib])
    with open(lib, "r+b") as f:
        shared = mmap.mmap(f.fileno(), 4096, flags=mmap.MAP_SHARED)
    try:
        r = enforce.run([str(bins["probe"]), "mmap", str(lib)])
        assert r.returncode == KILLED and "ok" not in r.stdout, r
        assert _only_denial(events) == (Hook.MMAP, Reason.WRITABLE, _b(lib))
        r = enforce.run([str(lib), "hello"])  # ETXTBSY, or killed: never runs
        assert r.returncode != 0 and "hello" not in r.stdout, r
    finally:
        shared.close()
    assert enforce.run([str(bins["probe"]), "mmap", str(lib)]).stdout == "ok\n"


@pytest.mark.parametrize("how", ["mapshared", "mprotectshared"])
def test_shared_writable_mapping_of_trusted_file(
    enforce: Confined, events: Events, bins: dict[str, Path], tmp_path: Path, how: str
) -> None:
    """A confined task mapping a trusted file MAP_SHARED writable (at once, or by mprotect) is
    killed: it could rewrite trusted code without the key noticing. Untrusted files are fine."""
    _trust_probe(enforce, bins)
    lib = _copy(bins["other"], tmp_path / "lib")
    plain = _copy(bins["other"], tmp_path / "plain")
    enforce.trust([lib])
    r = enforce.run([str(bins["probe"]), how, str(lib)])
    assert r.returncode == KILLED and "ok" not in r.stdout, r
    assert _only_denial(events) == (Hook.WRITE, Reason.WRITABLE, _b(lib))
    assert enforce.run([str(bins["probe"]), how, str(plain)]).stdout == "ok\n"


def test_trusted_library_rewritten_while_mapped(
    enforce: Confined, events: Events, bins: dict[str, Path], tmp_path: Path
) -> None:
    """dd conv=notrunc over a trusted library that a process maps next: its key moved with
    the write, and the new bytes are denied. (A write into a file already mapped by a running
    confined task is refused at open by the fanotify side on this backend: the tree's part.)"""
    _trust_probe(enforce, bins)
    lib = _copy(bins["other"], tmp_path / "lib")
    enforce.trust([lib])
    assert enforce.run([str(bins["probe"]), "mmap", str(lib)]).stdout == "ok\n"
    subprocess.run(
        ["dd", f"if={bins['probe']}", f"of={lib}", "conv=notrunc", "status=none"], check=True
    )
    r = enforce.run([str(bins["probe"]), "mmap", str(lib)])
    assert r.returncode == KILLED, r
    assert _only_denial(events)[1] == Reason.UNTRUSTED


# ---- route 4: code the process writes itself ---------------------------------------------------


@pytest.mark.parametrize("argv", SELF_WRITTEN_CODE, ids=case_id)
def test_self_written_code_denied(
    enforce: Confined, events: Events, bins: dict[str, Path], argv: list[str]
) -> None:
    """Anonymous RWX, mprotect(RX) of a written buffer, shared anonymous RWX, SysV SHM_EXEC,
    READ_IMPLIES_EXEC, and a private mapping of a trusted file made W+X or written then RX."""
    _trust_probe(enforce, bins)
    cmd = [str(bins["probe"]), *(str(bins["probe"]) if a == "PROBE" else a for a in argv)]
    r = enforce.run(cmd)
    assert r.returncode == KILLED and "ran" not in r.stdout, r
    hook, reason, _ = _only_denial(events)
    assert reason == Reason.ANON_EXEC and hook in (Hook.MMAP, Hook.MPROTECT)
    assert enforce.run(cmd, confined=False).stdout == "ran 42\n"


def test_jit_flagged_program_may_write_code(enforce: Confined, bins: dict[str, Path]) -> None:
    """The exception: a program flagged TD_PROGRAM_JIT by its executable's key."""
    _trust_probe(enforce, bins)
    key = InodeKey.from_stat(os.stat(bins["probe"]))
    enforce.engine.backend.set_program_flags([(key, ProgramFlag.JIT)])  # type: ignore[attr-defined]
    for how in ("rwx", "mprotect", "shared"):
        assert enforce.run([str(bins["probe"]), "selfcode", how]).stdout == "ran 42\n"
    enforce.engine.backend.set_program_flags([(key, 0)])  # type: ignore[attr-defined]
    assert enforce.run([str(bins["probe"]), "selfcode", "rwx"]).returncode == KILLED


def test_executable_stack_denied(
    enforce: Confined, events: Events, bins: dict[str, Path]
) -> None:
    """-z execstack: the new image has an anonymous executable VMA (its stack)."""
    prog = bins["execstack"]
    enforce.trust(closure([str(prog), "/bin/true"]))
    r = enforce.run([str(prog), "hello"])
    assert r.returncode == KILLED and "hello" not in r.stdout, r
    assert _only_denial(events)[:2] == (Hook.EXEC, Reason.ANON_EXEC)
    assert enforce.run([str(prog), "hello"], confined=False).stdout == "hello from trusted\n"


def _python_closure() -> list[str]:
    """python3 and the extension modules (and their libraries) the shellcode script loads."""
    dynload = Path(sysconfig.get_config_var("DESTSHARED") or "")
    mods = [str(p) for p in dynload.glob("*.so")] if dynload.is_dir() else []
    return closure([sys.executable, *mods])


def test_python_ctypes_shellcode_denied(enforce: Confined, events: Events) -> None:
    """python3 + ctypes + mmap(RWX): ten lines of shellcode, killed at the mapping."""
    enforce.trust(_python_closure())
    argv = [os.path.realpath(sys.executable), "-I", "-c", SHELLCODE_PY]
    r = enforce.run(argv)
    assert r.returncode == KILLED and "ran" not in r.stdout, r
    assert _only_denial(events)[:2] == (Hook.MMAP, Reason.ANON_EXEC)
    assert enforce.run(argv, confined=False).stdout == "ran 42\n"
    py = os.path.realpath(sys.executable)
    r = enforce.run([py, "-I", "-c", "import ctypes, ssl, sqlite3; print(1)"])
    assert r.stdout == "1\n", r  # python with C extensions is no false denial


def test_python_ctypes_callbacks_need_the_jit_flag(enforce: Confined, events: Events) -> None:
    """libffi (Debian's, without static trampolines) puts a ctypes/cffi callback's trampoline in
    anonymous executable memory: a python that needs callbacks must be allowed as a JIT (README:
    `--allow-jit`)."""
    enforce.trust(_python_closure())
    py = os.path.realpath(sys.executable)
    r = enforce.run([py, "-I", "-c", CALLBACK_PY])
    if r.returncode == 0:  # a libffi with static trampolines: nothing to flag
        assert r.stdout == "[1, 2, 3]\n"
        return
    assert r.returncode == KILLED, r
    assert _only_denial(events)[:2] == (Hook.MMAP, Reason.ANON_EXEC)
    key = InodeKey.from_stat(os.stat(py))
    enforce.engine.backend.set_program_flags([(key, ProgramFlag.JIT)])  # type: ignore[attr-defined]
    r = enforce.run([py, "-I", "-c", CALLBACK_PY])
    assert (r.returncode, r.stdout) == (0, "[1, 2, 3]\n"), r


@pytest.mark.skipif(shutil.which("node") is None, reason="node is not installed")
def test_node_runs_when_flagged_jit(enforce: Confined) -> None:
    """node's JIT writes code: confined, it runs only when its executable is flagged JIT (the
    policy's `--allow-jit`)."""
    node = os.path.realpath(shutil.which("node") or "")
    enforce.trust(closure([node]))
    argv = [node, "-e", "console.log(6 * 7)"]
    assert enforce.run(argv).returncode == KILLED
    key = InodeKey.from_stat(os.stat(node))
    enforce.engine.backend.set_program_flags([(key, ProgramFlag.JIT)])  # type: ignore[attr-defined]
    r = enforce.run(argv)
    assert (r.returncode, r.stdout) == (0, "42\n"), r


# ---- route 6: what a backend cannot close is said by name -------------------------------------


def test_every_backend_names_its_holes() -> None:
    from trustdb.backends import COMPILED

    for cls in COMPILED:
        names = [h.split(":", 1)[0] for h in cls.holes]
        assert names and len(set(names)) == len(names), cls.name
        assert all(": " in h and " " not in n for h, n in zip(cls.holes, names, strict=True))
    by_name = {c.name: {h.split(":")[0] for h in c.holes} for c in COMPILED}
    assert {"inline-code", "sigkill-not-eperm", "scripts-in-userspace"} <= by_name["tracepoint"]
    assert "script-names-in-kernel" in by_name["lsm"]


def test_trustdb_backends_lists_the_holes() -> None:
    r = subprocess.run(
        [sys.executable, "-c", "from trustdb.cli import main; main()", "backends", "--json"],
        capture_output=True, text=True, check=False,
    )  # fmt: skip
    assert r.returncode == 0, r.stderr
    import json

    rows = {row["name"]: row for row in json.loads(r.stdout)}
    assert any(h.startswith("sigkill-not-eperm:") for h in rows["tracepoint"]["holes"])
