"""Which files an interpreter process loads as code, by identity rather than by name.

A confined interpreter (python3, bash, perl, awk...) opens many files; the first-seen handler
must tell its *scripts* (judged by content: untrusted is refused) from its *data* (allowed).
Names lie: a symlink, `/dev/fd/3` or `/proc/self/fd/3` reach an untrusted script under any
name. So this module reads what the interpreter was told to run, from its final command line
and environment (both fixed at exec, read from /proc/PID), parses them the way that
interpreter does (`script_plan`), resolves every named file inside the tree's own root, cwd and
descriptors (`resolve_in_tree`), and hands back (dev, ino) pairs: a file the interpreter opens
is its script when it *is* one of those files, whatever path it was opened by.

Also named here: the files an interpreter runs at start-up without a command-line mention
($BASH_ENV and $ENV for shells, $PYTHONPATH entries such as `evil.zip` for python,
$PERL5OPT / $RUBYOPT / $NODE_OPTIONS module options, `LUA_INIT=@file`), and whether the command
line asks for inline code (`-c`, `-e`, a program text, code on stdin): `deny_inline` refuses it.
"""

from __future__ import annotations

import contextlib
import errno
import fnmatch
import os
import shlex
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

from trustdb.fskeys import fs_magic

PROC_SUPER_MAGIC = 0x9FA0
MAX_SYMLINKS = 40
"""As the kernel's own limit for one path walk."""


@dataclass(frozen=True, slots=True)
class ScriptPlan:
    """What one interpreter command line runs."""

    files: tuple[str, ...] = ()
    """Paths it loads as code (its script, `-f` program files, start-up files, -r modules)."""
    inline: str = ""
    """Why it runs code that is no file (`-c`, `-e`, a program text, stdin); '' if it does not."""
    rc_files: tuple[str, ...] = ()
    """A shell's rc files under $HOME / $ZDOTDIR (login and interactive shells run them): code
    where the tree can write them; on a read-only mount they are the user's own."""


# --- how each interpreter reads its command line ------------------------------------------------


@dataclass(frozen=True, slots=True)
class _Syntax:
    """An interpreter's options, as far as finding its script needs."""

    inline: str = ""
    """Short options that take inline code (`c` for python and shells, `e` for perl...)."""
    with_value: str = ""
    """Short options that take a separate value (`-W arg`)."""
    files: str = ""
    """Short options whose value is a code file (`awk -f FILE`, `php -f FILE`, `node -r`)."""
    long_inline: tuple[str, ...] = ()
    long_with_value: tuple[str, ...] = ()
    long_files: tuple[str, ...] = ()
    stops: str = ""
    """Short options after which the rest are the program's own arguments (`python -m mod`)."""
    program_text: bool = False
    """Without a file option, the first operand is the program itself (awk)."""
    stdin_without_script: bool = True
    """No script operand means code is read from stdin."""
    interactive: str = ""
    """Short options that read code from stdin after the script (`python -i`, `perl -d`)."""
    stdin: str = ""
    """Short options that read the commands from stdin; every operand is an argument (`bash -s
    x`: x is only $1)."""
    code_modules: tuple[str, ...] = ()
    """`-m` modules that run code from their arguments or stdin (`python -m timeit CODE`)."""
    file_modules: tuple[str, ...] = ()
    """`-m` modules that run the code in their file operands, whatever their names."""
    module_code: str = ""
    """Short options whose value becomes source text (`perl -MNAME` is `use NAME;`)."""


_PYTHON = _Syntax(inline="c", with_value="WX", stops="m", interactive="i",
                  long_with_value=("--check-hash-based-pycs",),
                  code_modules=("timeit", "code", "pdb", "idlelib", "idlelib.idle", "cProfile",
                                "profile", "trace", "asyncio",
                                "pickle"),  # loading a pickle calls what it names: os.system
                  file_modules=("doctest", "runpy", "pyclbr", "compileall", "py_compile"))
_SHELL = _Syntax(inline="c", with_value="oO", stdin="s", interactive="i",
                 long_with_value=("--rcfile", "--init-file"),
                 long_files=("--rcfile", "--init-file"))
_PERL = _Syntax(inline="eE", with_value="IMmx", interactive="d", module_code="Mm")
_RUBY = _Syntax(inline="e", with_value="IrCE", files="r")
_NODE = _Syntax(inline="ep", with_value="r", files="r",
                long_inline=("--eval", "--print"),
                long_with_value=("--require", "--import", "--loader", "--experimental-loader",
                                 "--env-file", "--title"),
                long_files=("--require", "--import", "--loader", "--experimental-loader"))
_PHP = _Syntax(inline="rBRE", with_value="cdfzt", files="f")
_LUA = _Syntax(inline="e", with_value="l")
_AWK = _Syntax(with_value="fvFW", files="f", long_with_value=("--file", "--assign",
                                                              "--field-separator"),
               long_files=("--file",), program_text=True)
_TCL = _Syntax()
_GENERIC = _Syntax(stdin_without_script=False)
"""An interpreter known by content under a name we cannot parse for: every operand that names
a file counts as code (strict: a data operand of an untrusted file is refused)."""

FAMILIES: tuple[tuple[str, _Syntax], ...] = (
    ("python*", _PYTHON), ("pypy*", _PYTHON),
    ("bash", _SHELL), ("sh", _SHELL), ("dash", _SHELL), ("zsh", _SHELL), ("ksh*", _SHELL),
    ("mksh", _SHELL), ("ash", _SHELL), ("yash", _SHELL), ("fish", _SHELL),
    ("perl*", _PERL), ("ruby*", _RUBY), ("node*", _NODE), ("nodejs", _NODE),
    ("php*", _PHP), ("lua*", _LUA), ("luajit*", _LUA),
    ("*awk", _AWK), ("awk*", _AWK),
    ("tclsh*", _TCL), ("wish*", _TCL),
)


def syntax_for(name: str) -> _Syntax:
    base = os.path.basename(name)
    for pattern, syntax in FAMILIES:
        if fnmatch.fnmatchcase(base, pattern):
            return syntax
    return _GENERIC


def parse_arguments(argv: list[str], syntax: _Syntax | None = None) -> ScriptPlan:
    """The files and inline code one command line (argv[0] included) names."""
    if not argv:
        return ScriptPlan()
    s = syntax or syntax_for(argv[0])
    files: list[str] = []
    has_file_option = False
    interactive = ""
    """Code read from stdin after the script: inline code, and the script still counts."""
    from_stdin = ""
    i = 1
    while i < len(argv):
        arg = argv[i]
        if arg == "--":
            i += 1
            break
        if arg == "-" or not arg.startswith(("-", "+")) or arg.startswith("++"):
            break
        if arg.startswith("--"):
            name, eq, value = arg.partition("=")
            if name in s.long_inline:
                return ScriptPlan(tuple(files), f"inline code ({name})")
            if name in s.long_with_value:
                if not eq:
                    i += 1
                    value = argv[i] if i < len(argv) else ""
                if value:
                    files.append(value)  # judged if it is a file: a parse slip cannot hide one
                has_file_option |= name in s.long_files and bool(value)
            elif not eq and i + 1 < len(argv):
                files.append(argv[i + 1])  # an option we do not know may take a value
            i += 1
            continue
        # A cluster of short options: `-Bc CODE`, `-ec`, `-Wignore`, `-fprog.awk`.
        letters = arg[1:]
        for k, letter in enumerate(letters):
            if letter in s.inline:
                return ScriptPlan(tuple(files), f"inline code (-{letter})")
            if letter in s.interactive:
                if letters[k + 1:k + 2] == ":":
                    break  # perl -d:MODULE: a module by name, no debugger session
                interactive = interactive or f"code on stdin (-{letter})"
            if letter in s.stops:
                plan = _module_plan(argv[i + 1:] if k + 1 == len(letters) else
                                    [letters[k + 1:], *argv[i + 1:]], s, files)
                return ScriptPlan(plan.files, plan.inline or interactive)
            if letter in s.stdin:
                from_stdin = from_stdin or f"code on stdin (-{letter})"
            if letter in s.with_value:
                value = letters[k + 1:]
                if not value:
                    i += 1
                    value = argv[i] if i < len(argv) else ""
                if letter in s.module_code and not _is_module_name(value):
                    return ScriptPlan(tuple(files), f"inline code (-{letter}{value[:20]})")
                if value:
                    files.append(value)  # judged if it is a file (see above)
                has_file_option |= letter in s.files and bool(value)
                break
        i += 1
    if from_stdin:
        return ScriptPlan(tuple(files), from_stdin)
    plan = _operand_plan(argv[i:], s, files, has_file_option)
    return ScriptPlan(plan.files, plan.inline or interactive)


def _operand_plan(operands: list[str], s: _Syntax, files: list[str],
                  has_file_option: bool) -> ScriptPlan:
    if s is _GENERIC:
        return ScriptPlan((*files, *operands))
    if s.program_text and not has_file_option:
        return ScriptPlan(tuple(files), "inline code (program text)" if operands else "")
    if has_file_option and s.program_text:
        return ScriptPlan(tuple(files))
    if not operands or operands[0] == "-":
        if files or not s.stdin_without_script:
            return ScriptPlan(tuple(files))
        return ScriptPlan(tuple(files), "code on stdin")
    return ScriptPlan((*files, operands[0]))


def _module_plan(rest: list[str], s: _Syntax, files: list[str]) -> ScriptPlan:
    """`python -m MODULE ARGS`: a module that runs code from its arguments or stdin is inline
    code; one that runs its file operands makes them code files."""
    module = rest[0] if rest else ""
    if module in s.code_modules:
        return ScriptPlan(tuple(files), f"inline code (-m {module})")
    if module in s.file_modules:
        return ScriptPlan((*files, *(a for a in rest[1:] if not a.startswith("-"))))
    return ScriptPlan(tuple(files))


def _is_module_name(value: str) -> bool:
    """perl's `-MNAME=args`: NAME becomes source text (`use NAME split(/,/, q{args})`), so
    anything but a module name (or `-NAME` for `no`) in it is code."""
    name = value.partition("=")[0].removeprefix("-")
    return all(c.isalnum() or c in "_:" for c in name)


# --- start-up files named by the environment ----------------------------------------------------


def _option_files(value: str, syntax: _Syntax) -> tuple[str, ...]:
    return parse_arguments(["interpreter", *_words(value), "-"], syntax).files


def environment_files(name: str, env: Mapping[str, str]) -> tuple[str, ...]:
    """Files the interpreter called `name` runs at start-up because its environment says so."""
    s = syntax_for(name)
    out: list[str] = []
    if s is _SHELL:
        out += [env[k] for k in ("BASH_ENV", "ENV") if env.get(k)]
    elif s is _PYTHON:
        out += [p for p in env.get("PYTHONPATH", "").split(":") if p]
        if env.get("PYTHONSTARTUP"):
            out.append(env["PYTHONSTARTUP"])
    elif s is _PERL:
        out += _option_files(env.get("PERL5OPT", ""), _PERL)
    elif s is _RUBY:
        out += _option_files(env.get("RUBYOPT", ""), _RUBY)
    elif s is _NODE:
        out += _option_files(env.get("NODE_OPTIONS", ""), _NODE)
    elif s is _LUA:
        init = env.get("LUA_INIT", "")
        if init.startswith("@"):
            out.append(init[1:])
    return tuple(out)


def environment_inline(name: str, env: Mapping[str, str]) -> str:
    """Why the environment makes the interpreter `name` run code that is no file ('' if not):
    PYTHONINSPECT (stdin after the script), perl's PERL5OPT -M with code, node's
    NODE_OPTIONS --import of a data: URL."""
    s = syntax_for(name)
    if s is _PYTHON and env.get("PYTHONINSPECT"):
        return "code on stdin (PYTHONINSPECT)"
    options = {_PERL: "PERL5OPT", _NODE: "NODE_OPTIONS"}.get(s, "")
    value = env.get(options, "") if options else ""
    if not value:
        return ""
    if s is _NODE:
        return f"inline code ({options} data: URL)" if "data:" in value else ""
    plan = parse_arguments(["interpreter", *_words(value), "-"], s)
    return f"{plan.inline} in {options}" if plan.inline.startswith("inline") else ""


def _words(value: str) -> list[str]:
    try:
        return shlex.split(value)
    except ValueError:
        return value.split()


_RC_FILES = {
    "bash": (".bash_profile", ".bash_login", ".profile", ".bashrc", ".bash_logout"),
    "zsh": (".zshenv", ".zprofile", ".zshrc", ".zlogin", ".zlogout"),
}


def shell_rc_files(name: str, env: Mapping[str, str]) -> tuple[str, ...]:
    """The rc files a shell `name` may run from the directories its environment names."""
    if syntax_for(name) is not _SHELL:
        return ()
    base = os.path.basename(name)
    rc = _RC_FILES.get(base, (".profile",))
    home = env.get("ZDOTDIR") or env.get("HOME", "") if base == "zsh" else env.get("HOME", "")
    return tuple(f"{home}/{f}" for f in rc) if home.startswith("/") else ()


BUSYBOX_DATA_APPLETS = frozenset({
    "cat", "head", "tail", "ls", "wc", "grep", "egrep", "fgrep", "cut", "sort", "uniq", "tr",
    "od", "hexdump", "xxd", "md5sum", "sha1sum", "sha256sum", "sha512sum", "cmp", "diff",
    "cp", "mv", "rm", "ln", "mkdir", "rmdir", "touch", "chmod", "chown", "stat", "du", "df",
    "echo", "printf", "true", "false", "test", "[", "[[", "basename", "dirname", "readlink",
    "realpath", "tee", "tar", "gzip", "gunzip", "zcat", "bzip2", "bunzip2", "xz", "unxz",
    "less", "more", "strings", "base64", "dd", "truncate", "seq", "sleep", "date", "id",
    "whoami", "uname", "pwd", "find", "which",
})
"""Busybox applets that read their operands as data, never as code. Any other applet is read
as its own interpreter (`sh`, `awk`) or by the strict generic rule (every operand is code)."""


def busybox_applet(argv: list[str]) -> tuple[str, list[str]]:
    """The applet busybox runs for `argv` and that applet's own argv: busybox goes by
    basename(argv[0]) (`exec -a sh busybox x`, a symlink named sh) unless that is busybox*,
    then by argv[1]."""
    base = os.path.basename(argv[0]) if argv else ""
    if base.startswith("busybox"):
        return (os.path.basename(argv[1]), argv[1:]) if len(argv) > 1 else ("", [])
    return base, argv


def runs_data_applet(pid: int, at: int = 0) -> bool:
    """Whether busybox (task `pid`, its argv at `at` in its cmdline) runs an applet that reads
    its operands as data: then no file it opens is code (`busybox cat x.sh`). In doubt, no."""
    try:
        argv = read_nul_list(f"/proc/{pid}/cmdline")[at:]
    except OSError:
        return False
    return bool(argv) and busybox_applet(argv)[0] in BUSYBOX_DATA_APPLETS


def script_plan(argv: list[str], env: Mapping[str, str], name: str) -> ScriptPlan:
    """Everything an interpreter started as `argv` with `env` loads as code. `name` is what
    the interpreter *is* (the name its trusted content was recorded under), never argv[0] or
    the file's current name, which the tree chooses (`exec -a awk perl ...`). Busybox is the
    one exception: it *is* whichever applet argv[0] names."""
    if os.path.basename(name).startswith("busybox"):
        name, argv = busybox_applet(argv)
        if not argv or name in BUSYBOX_DATA_APPLETS:
            return ScriptPlan()
    syntax = syntax_for(name)
    plan = parse_arguments([name, *argv[1:]], syntax) if argv else ScriptPlan()
    inline = plan.inline or environment_inline(name, env)
    return ScriptPlan((*plan.files, *environment_files(name, env)), inline,
                      shell_rc_files(name, env))


# --- resolving names inside the tree ------------------------------------------------------------


def _nspid(pid: int) -> str:
    """`pid` as its own pid namespace numbers it (what /proc/self means inside the tree)."""
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("NSpid:"):
                return line.split()[-1]
    return str(pid)


def _walk(pid: int, path: str) -> int | None:
    """An O_PATH fd of `path` as task `pid` would resolve it: from its root and cwd, absolute
    symlinks from its root, /proc/self as itself, /proc/N/fd/M through the kernel's own magic
    link. O_PATH opens raise no fanotify event (the handler must not ask itself)."""
    flags = os.O_PATH | os.O_CLOEXEC
    root = os.open(f"/proc/{pid}/root", flags | os.O_DIRECTORY)
    try:
        root_id = _identity(root)
        cur = os.dup(root) if path.startswith("/") else os.open(f"/proc/{pid}/cwd", flags)
        parts = [p for p in path.split("/") if p and p != "."]
        hops = 0
        while parts:
            name = parts.pop(0)
            on_proc = fs_magic(cur) == PROC_SUPER_MAGIC
            if name == "..":
                nxt = os.dup(cur) if _identity(cur) == root_id else os.open("..", flags,
                                                                           dir_fd=cur)
            elif on_proc:
                if name in ("self", "thread-self") and _is_proc_root(cur):
                    me = _nspid(pid)
                    parts[:0] = [me] if name == "self" else [me, "task", me]
                    continue
                nxt = os.open(name, flags, dir_fd=cur)  # magic links resolve in the kernel
            else:
                try:
                    target = os.readlink(name, dir_fd=cur)
                except OSError as e:
                    if e.errno != errno.EINVAL:
                        raise
                    nxt = os.open(name, flags | os.O_NOFOLLOW, dir_fd=cur)
                else:
                    hops += 1
                    if hops > MAX_SYMLINKS:
                        raise OSError(errno.ELOOP, "too many symlinks")
                    parts[:0] = [p for p in target.split("/") if p and p != "."]
                    if target.startswith("/"):
                        os.close(cur)
                        cur = os.dup(root)
                    continue
            os.close(cur)
            cur = nxt
        return cur
    except OSError:
        with contextlib.suppress(NameError, OSError):
            os.close(cur)
        return None
    finally:
        os.close(root)


def _identity(fd: int) -> tuple[int, int]:
    st = os.fstat(fd)
    return st.st_dev, st.st_ino


def _is_proc_root(fd: int) -> bool:
    return os.fstat(fd).st_ino == 1


def resolve_fd(pid: int, path: str) -> int | None:
    """An O_PATH fd of the file `path` names for task `pid` (the caller closes it), or None."""
    return _walk(pid, path)


def resolve_in_tree(pid: int, path: str, *, writable_only: bool = False
                    ) -> tuple[int, int] | None:
    """(st_dev, st_ino) of the regular file `path` names for task `pid`, or None (also, with
    `writable_only`, when it lies on a read-only mount)."""
    fd = _walk(pid, path)
    if fd is None:
        return None
    try:
        st = os.fstat(fd)
        if writable_only and os.fstatvfs(fd).f_flag & os.ST_RDONLY:
            return None
        return (st.st_dev, st.st_ino) if (st.st_mode & 0o170000) == 0o100000 else None
    finally:
        os.close(fd)


# --- one process --------------------------------------------------------------------------------


def read_nul_list(path: str) -> list[str]:
    with open(path, "rb") as f:
        return [a.decode(errors="surrogateescape") for a in f.read().split(b"\0")[:-1]]


def names(patterns: Iterable[str]) -> tuple[str, ...]:
    """The basename globs of interpreter path globs (`/usr/bin/python3*` -> `python3*`)."""
    return tuple(sorted({os.path.basename(p) for p in patterns if os.path.basename(p)}))
