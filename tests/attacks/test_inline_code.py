"""deny_inline (issue 10, section 3), tracepoint backend: a policy that refuses inline code for
listed interpreters, where the backend sees their arguments (trustdb.inline_code): the
command line read once the new program runs, at its C library open, before its first
instruction. The agent policy leaves deny_inline empty (agents run `bash -c` all the time);
these runs use a copy of it that lists python3, perl and bash.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.engine.test_run import run_confined, workdir_of

pytestmark = [pytest.mark.root, pytest.mark.bpf]

MARK = "INLINE-CODE-RAN"
PYTHON = "/usr/bin/python3"


@pytest.fixture
def deny_inline_policy(tmp_path: Path) -> Path:
    agent = (Path(__file__).parents[2] / "policies" / "agent.toml").read_text()
    assert "deny_inline = []" in agent
    policy = tmp_path / "no-inline.toml"
    policy.write_text(agent.replace("deny_inline = []",
                                    'deny_inline = ["python3", "perl", "bash"]'))
    return policy


@pytest.mark.parametrize("command", [
    f"{PYTHON} -c 'print(\"{MARK}\")'",
    f"{PYTHON} -W ignore -Bc 'print(\"{MARK}\")'",
    f"echo 'print(\"{MARK}\")' | {PYTHON}",
    f"echo 'print(\"{MARK}\")' | {PYTHON} -",
    f"/lib64/ld-linux-x86-64.so.2 {PYTHON} -c 'print(\"{MARK}\")'",
    f"perl -e 'print \"{MARK}\\n\"'",
    f"bash -c 'echo {MARK}'",
    f"echo 'echo {MARK}' | bash -s x",  # x is only $1: the commands come from stdin
    f"cp /usr/bin/python3.11 ./notpython && ./notpython -c 'print(\"{MARK}\")'",
    # Code that no -c names: a stdlib module that runs its arguments or stdin, an interactive
    # session after the script, perl's -M module name (perl builds `use NAME;` from it).
    f"{PYTHON} -m timeit -n1 'print(\"{MARK}\")'",
    f"echo 'print(\"{MARK}\")' | {PYTHON} -m code",
    f"{PYTHON} -m pdb -c '!print(\"{MARK}\")' -c q /dev/null",
    f"echo 'print(\"{MARK}\")' | {PYTHON} -i /dev/null",
    f"echo 'print(\"{MARK}\")' | PYTHONINSPECT=1 {PYTHON} /dev/null",
    f"perl '-Mstrict;print \"{MARK}\\n\"' /dev/null",
    f"PERL5OPT='-Mstrict;print \"{MARK}\\n\";' perl /dev/null",
    # A pickle is code: loading it calls what it names (second review: this ran os.system).
    f"printf \"cos\\nsystem\\n(S'echo {MARK}'\\ntR.\" > evil.pkl && {PYTHON} -m pickle evil.pkl",
    f"printf \"cos\\nsystem\\n(S'echo {MARK}'\\ntR.\" | {PYTHON} -m pickle",
])
def test_inline_code_refused(interpreters_db: Path, run_env: dict[str, str],
                             deny_inline_policy: Path, command: str) -> None:
    got = run_confined(interpreters_db, f"{command}; echo rc=$?", run_env,
                       "--policy", str(deny_inline_policy))
    assert MARK not in got.out, (got.out, got.err)
    assert "rc=0" not in got.out, got.out
    assert "denied inline code of" in got.err and "deny_inline" in got.err, got.err


def test_scripts_and_modules_still_run(interpreters_db: Path, run_env: dict[str, str],
                                       deny_inline_policy: Path) -> None:
    """Control: a trusted module or script is no inline code; sh (not listed) keeps -c."""
    (workdir_of(run_env) / "data.json").write_text('{"a": 1}\n')
    got = run_confined(interpreters_db, f"{PYTHON} -m json.tool data.json; echo rc=$?", run_env,
                       "--policy", str(deny_inline_policy))
    assert '"a": 1' in got.out and "rc=0" in got.out, (got.out, got.err)
    assert "denied" not in got.err, got.err


def test_doctest_of_an_untrusted_text_file_refused(interpreters_db: Path, run_env: dict[str, str],
                                                    deny_inline_policy: Path) -> None:
    """`python3 -m doctest notes.txt` runs the `>>>` lines of a file named like no script:
    the file is code, judged by content (untrusted here: refused)."""
    (workdir_of(run_env) / "notes.txt").write_text(f'>>> print("{MARK}")\n')
    got = run_confined(interpreters_db, f"{PYTHON} -m doctest notes.txt; echo rc=$?", run_env,
                       "--policy", str(deny_inline_policy))
    assert MARK not in got.out, (got.out, got.err)
    assert "denied script load" in got.err, got.err
