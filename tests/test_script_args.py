"""How an interpreter's command line and environment name its code files (trustdb.script_args),
and how those names resolve to files by identity, as the process itself resolves them."""

from __future__ import annotations

import os
import subprocess
import time
from pathlib import Path

import pytest

from trustdb.script_args import (
    environment_files,
    parse_arguments,
    resolve_in_tree,
    script_plan,
)
from trustdb.script_files import ScriptFiles, names_planned


@pytest.mark.parametrize(("argv", "files", "inline"), [
    (["python3", "evil.data", "arg"], ("evil.data",), ""),
    (["python3", "-W", "ignore", "-X", "dev", "x", "data"], ("ignore", "dev", "x"), ""),
    (["python3", "--check-hash-based-pycs", "always", "x"], ("always", "x"), ""),
    (["python3", "-Bc", "print(1)"], (), "inline code (-c)"),
    (["python3", "-m", "json.tool", "data.json"], (), ""),
    (["python3"], (), "code on stdin"),
    (["bash", "-o", "pipefail", "s", "data"], ("pipefail", "s"), ""),
    (["bash", "-ec", "true"], (), "inline code (-c)"),
    (["bash", "--norc", "s"], ("s", "s"), ""),
    (["perl", "-I", "lib", "x"], ("lib", "x"), ""),
    (["perl", "-e", "1"], (), "inline code (-e)"),
    (["mawk", "-f", "prog", "data"], ("prog",), ""),
    (["mawk", "{print}", "data"], (), "inline code (program text)"),
    (["node", "-r", "./hook", "main"], ("./hook", "main"), ""),
    (["node", "--require=./hook", "-e", "1"], ("./hook",), "inline code (-e)"),
    (["bash", "-s", "x"], (), "code on stdin (-s)"),
    (["sh", "-es", "x", "y"], (), "code on stdin (-s)"),
    (["bash", "-i", "x"], ("x",), "code on stdin (-i)"),
    (["renamed-copy", "a", "b"], ("a", "b"), ""),
])
def test_parse_arguments(argv: list[str], files: tuple[str, ...], inline: str) -> None:
    plan = parse_arguments(argv)
    assert plan.files == files
    assert plan.inline == inline


@pytest.mark.parametrize(("argv", "files"), [
    (["sh", "./evil"], ("./evil",)),  # exec -a sh busybox ./evil, or a symlink named sh
    (["awk", "-f", "./evil.awk"], ("./evil.awk",)),
    (["busybox", "sh", "s"], ("s",)),
    (["/tmp/x/busybox", "ash", "s"], ("s",)),
    (["busybox", "cat", "s"], ()),
    (["cat", "s"], ()),
    (["not-an-applet", "a", "b"], ("a", "b")),  # unknown: every operand is code
    (["busybox", "not-an-applet", "a"], ("a",)),
])
def test_busybox_is_the_applet_argv0_names(argv: list[str], files: tuple[str, ...]) -> None:
    assert script_plan(argv, {}, "busybox").files == files


def test_names_planned() -> None:
    assert names_planned(b"/wd/x", ("x",)) and names_planned(b"x", ("./x",))
    assert names_planned(b"/dev/fd/3", ("/dev/fd/3",))
    assert not names_planned(b"/wd/y", ("x",)) and not names_planned(b"/wd/ax", ("x",))


def test_the_interpreters_own_name_decides_not_argv0() -> None:
    """`exec -a awk perl evil` must still be read as perl (the first operand is the script)."""
    assert script_plan(["awk", "evil"], {}, "perl").files == ("evil",)


def test_environment_start_up_files() -> None:
    assert environment_files("bash", {"BASH_ENV": "./e", "ENV": "/x"}) == ("./e", "/x")
    assert environment_files("python3.11", {"PYTHONPATH": "a.zip:lib"}) == ("a.zip", "lib")
    assert environment_files("perl", {"PERL5OPT": "-I/x -Mevil"}) == ("/x", "evil")
    assert environment_files("node", {"NODE_OPTIONS": "--require ./h.js"}) == ("./h.js",)
    assert environment_files("lua5.4", {"LUA_INIT": "@init"}) == ("init",)


def test_resolve_symlinks_and_descriptors(tmp_path: Path) -> None:
    """A symlink (relative and absolute), /dev/fd/N and /proc/self/fd/N name the same file,
    for the process that holds the descriptor (not for us)."""
    target = tmp_path / "evil.data"
    target.write_text("x\n")
    (tmp_path / "rel").symlink_to("evil.data")
    (tmp_path / "abs").symlink_to(target)
    (tmp_path / "fdlink").symlink_to("/proc/self/fd/3")
    want = (target.stat().st_dev, target.stat().st_ino)
    with subprocess.Popen(["sleep", "30"], cwd=tmp_path, stdin=subprocess.DEVNULL) as p:
        try:
            assert resolve_in_tree(p.pid, "rel") == want
            assert resolve_in_tree(p.pid, "abs") == want
            assert resolve_in_tree(p.pid, str(target)) == want
            assert resolve_in_tree(p.pid, "../" + tmp_path.name + "/rel") == want
            assert resolve_in_tree(p.pid, "missing") is None
            assert resolve_in_tree(p.pid, "/dev/fd/0") is None  # /dev/null: not a regular file
        finally:
            p.kill()
    fd = os.open(target, os.O_RDONLY)
    try:
        with subprocess.Popen(["sleep", "30"], cwd=tmp_path, pass_fds=(fd,)) as p:
            try:
                assert resolve_in_tree(p.pid, f"/proc/self/fd/{fd}") == want
                assert resolve_in_tree(p.pid, f"/dev/fd/{fd}") == want
            finally:
                p.kill()
    finally:
        os.close(fd)


def test_identities_follow_an_exec(tmp_path: Path) -> None:
    script = tmp_path / "s"
    script.write_text("sleep 30\n")
    ids = ScriptFiles()
    with subprocess.Popen(["bash", str(script)], cwd=tmp_path) as p:
        try:
            st = script.stat()
            for _ in range(200):  # until the child has exec'd bash (its cmdline changes)
                if (st.st_dev, st.st_ino) in ids.of(p.pid, "bash"):
                    break
                time.sleep(0.01)
            # the script, and the rc files of $HOME that lie on a writable mount
            assert (st.st_dev, st.st_ino) in ids.of(p.pid, "bash")
        finally:
            p.kill()


def test_shell_rc_files_are_named_from_the_environment() -> None:
    """A login or interactive shell runs rc files from $HOME ($ZDOTDIR for zsh): named so the
    handler judges them where the tree can write them (trustdb.script_args.shell_rc_files)."""
    from trustdb.script_args import shell_rc_files

    assert "/w/h/.bash_profile" in shell_rc_files("bash", {"HOME": "/w/h"})
    assert shell_rc_files("dash", {"HOME": "/w/h"}) == ("/w/h/.profile",)
    assert "/z/.zshenv" in shell_rc_files("zsh", {"HOME": "/w/h", "ZDOTDIR": "/z"})
    assert shell_rc_files("python3", {"HOME": "/w/h"}) == ()
    assert shell_rc_files("bash", {"HOME": "relative"}) == ()


def test_identities_are_not_frozen(tmp_path: Path) -> None:
    """A planned file created after the first look is found at the next (no cache of files)."""
    files = ScriptFiles()
    with subprocess.Popen(["sleep", "30"], cwd=tmp_path, env={"PATH": "/usr/bin:/bin"}) as p:
        try:
            for _ in range(200):  # no HOME: no shell rc files in the plan
                plan = files.plan(p.pid, "bash")
                if plan is not None and plan.files == ("30",):
                    break
                time.sleep(0.01)
            assert files.of(p.pid, "bash") == frozenset()
            (tmp_path / "30").write_text("x\n")
            st = (tmp_path / "30").stat()
            assert files.of(p.pid, "bash") == {(st.st_dev, st.st_ino)}
        finally:
            p.kill()
