#!/usr/bin/env bash
# The main job, end to end (`make demo` runs install-deps and the BPF build first):
# trust this machine's packages and a project's build, then run a command under `trustdb run`:
# the trusted build runs, an untrusted binary and an untrusted library are denied with one line
# each, and `trustdb trust ...` lets them run.
# Uses its own database (build/demo/db, or $TRUSTDB_DB) so /var/lib/trustdb is left alone.
# `trustdb run` confines only the command it starts (its own cgroup): safe on any host.
set -euo pipefail
top=$(cd "$(dirname "$0")/.." && pwd)
demo="$top/build/demo"
export TRUSTDB_DB="${TRUSTDB_DB:-$demo/db}"
export TRUSTDB_LOG="${TRUSTDB_LOG:-$demo/decisions.jsonl}"
trustdb() { python3 -c 'from trustdb.cli import main; main()' "$@"; }

step() { printf '\n\033[1m$ %s\033[0m\n' "$*"; }
expect_fail() { if "$@"; then echo "demo: expected a failure from: $*" >&2; exit 1; fi; }

rm -rf "$demo"
mkdir -p "$demo/proj/bin" "$demo/proj/lib" "$demo/downloads"
cd "$demo"
# A project: a program and the library it links, both built here (and trusted below).
printf 'const char *greeting(void) { return "hello from a trusted build"; }\n' > proj/greet.c
printf '#include <stdio.h>\nconst char *greeting(void);\nint main(void) { puts(greeting()); return 0; }\n' > proj/hello.c
cc -O2 -shared -fPIC -o proj/lib/libgreet.so proj/greet.c
cc -O2 -o proj/bin/hello proj/hello.c -Lproj/lib -lgreet -Wl,-rpath,"$demo/proj/lib"
# Code nobody trusted: a downloaded binary, and a library that would hijack the trusted program.
printf '#include <stdio.h>\nint main(void) { puts("an untrusted binary ran"); return 0; }\n' > stranger.c
cc -O2 -o downloads/stranger stranger.c
printf 'const char *greeting(void) { return "an untrusted library ran"; }\n' > evil.c
cc -O2 -shared -fPIC -o downloads/libevil.so evil.c

step trustdb import deb                    # this machine's packages: MD5-verified, BLAKE3 recorded
rc=0; trustdb import deb || rc=$?           # 3: imported; files listed as FAILED are not trusted
[ "$rc" -eq 0 ] || [ "$rc" -eq 3 ] || exit "$rc"
step trustdb trust "$demo/proj"            # the build directory: its ELF, #! and exec-bit files
trustdb trust "$demo/proj"
step trustdb check proj/bin/hello downloads/stranger   # exit 1: one of them is not trusted
expect_fail trustdb check proj/bin/hello downloads/stranger

if [ "$(id -u)" -ne 0 ]; then
  echo; echo "demo: trustdb run needs root (it loads BPF programs); run make demo as root to see enforcement"
  exit 0
fi
script='proj/bin/hello; downloads/stranger; LD_PRELOAD=downloads/libevil.so proj/bin/hello; true'
step trustdb run -- sh -c "'$script'"     # trusted: runs; untrusted binary and library: denied
trustdb run -- sh -c "$script" 2>&1 | tee run1.out
grep -q "hello from a trusted build" run1.out
grep -q "denied exec of $demo/downloads/stranger" run1.out
grep -q "libevil.so" run1.out
if grep -q "an untrusted" run1.out; then echo "demo: untrusted code ran" >&2; exit 1; fi
step trustdb why event:-1                 # the last denial: what the kernel saw, and the fix
trustdb why event:-1 || true
step trustdb trust downloads/stranger downloads/libevil.so   # decide to trust them
trustdb trust downloads/stranger downloads/libevil.so
step trustdb run -- sh -c "'$script'"     # now all of it runs
trustdb run -- sh -c "$script" 2>&1 | tee run2.out
grep -q "an untrusted binary ran" run2.out && grep -q "an untrusted library ran" run2.out
step trustdb log --denied                 # the decisions, from the log
trustdb log --denied
echo
echo "demo: OK (database: $TRUSTDB_DB, decision log: $TRUSTDB_LOG)"
