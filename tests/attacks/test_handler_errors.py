"""An error inside the first-seen handler's judging of a confined interpreter's open (issue 10,
reviewer finding 6), tracepoint backend, in a real run: the handler parses what the tree
chose (its command line, environment, names), so an exception there must refuse the open in
enforce mode, never let it through. No input is known that makes the parsing raise (a fuzz of
script_plan found none), so the fault is injected: the handler is forked from this process
and inherits the patched method. Besides it, not instead of it, the attack tests in
test_script_routes.py run the same handler with nothing injected.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from trustdb import supervisor
from trustdb.script_files import ScriptFiles

pytestmark = [pytest.mark.root, pytest.mark.bpf]

MARK = "UNTRUSTED-SCRIPT-RAN"


def test_an_error_judging_a_script_load_refuses_it(interpreters_db: Path, tmp_path: Path,
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    real = ScriptFiles.is_code

    def broken(self: ScriptFiles, pid: int, name: str, *args: object) -> bool:
        if name.startswith("python"):  # the shell's own opens (its redirections) stay judged
            raise RuntimeError("injected fault")
        return real(self, pid, name, *args)  # type: ignore[arg-type]

    monkeypatch.setattr(ScriptFiles, "is_code", broken)
    (tmp_path / "evil.data").write_text(f'print("{MARK}")\n')
    out = tmp_path / "out"
    argv = ["/bin/sh", "-c",
            f"cd {tmp_path} && /usr/bin/python3 evil.data > {out} 2>&1; echo rc=$? >> {out}"]
    rc = supervisor.run(supervisor.RunOptions(argv=argv, db=interpreters_db,
                                              workdir=str(tmp_path)))
    got = out.read_text()
    assert rc == 0, got
    assert MARK not in got and "rc=0" not in got, got
