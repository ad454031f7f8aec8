#!/usr/bin/env bash
# The main job, end to end (`make demo` runs install-deps and the BPF build first):
# trust a project's build directory, check files, see a changed binary lose its trust.
# Uses its own database (build/demo/db, or $TRUSTDB_DB) so the machine's /var/lib/trustdb is
# left alone; drop TRUSTDB_DB to work on the real one.
set -euo pipefail
top=$(cd "$(dirname "$0")/.." && pwd)
demo="$top/build/demo"
export TRUSTDB_DB="${TRUSTDB_DB:-$demo/db}"

step() { printf '\n\033[1m$ %s\033[0m\n' "$*"; }
expect_fail() { if "$@"; then echo "demo: expected a failure from: $*" >&2; exit 1; fi; }

rm -rf "$demo/proj" "$demo/db"
mkdir -p "$demo/proj/bin"
printf '#include <stdio.h>\nint main(void) { puts("hello from a trusted build"); return 0; }\n' \
  > "$demo/proj/hello.c"
cc -O2 -o "$demo/proj/bin/hello" "$demo/proj/hello.c"
printf '#!/bin/sh\nexec "$(dirname "$0")/hello"\n' > "$demo/proj/bin/run.sh"
chmod +x "$demo/proj/bin/run.sh"

step trustdb trust "$demo/proj"              # records ELF, #! and exec-bit files (source dir:<path>)
trustdb trust "$demo/proj"

step trustdb check "$demo/proj/bin/hello"    # exit 0: trusted, and by whom
trustdb check "$demo/proj/bin/hello"

step trustdb check /bin/sh                   # exit 1: never trusted (until: trustdb import deb)
expect_fail trustdb check /bin/sh

step trustdb import deb --quiet              # this machine's dpkg database: MD5-verified, BLAKE3 recorded
rc=0; trustdb import deb --quiet || rc=$?    # 3: imported; files listed as FAILED are not trusted
[ "$rc" -eq 0 ] || [ "$rc" -eq 3 ] || exit "$rc"
step trustdb check /bin/sh                   # exit 0 now: trusted by deb:/ (package dash)
trustdb check /bin/sh

printf '\x00' >> "$demo/proj/bin/hello"      # the binary changes after it was trusted
step trustdb check "$demo/proj/bin/hello"    # exit 1: content changed since trusted at <time>
expect_fail trustdb check "$demo/proj/bin/hello"

step trustdb verify                          # re-hash every recorded path: reports the change
expect_fail trustdb verify

step trustdb trust "$demo/proj"              # re-trust the rebuilt directory: one transaction
trustdb trust "$demo/proj"
trustdb check "$demo/proj/bin/hello"

step trustdb sources
trustdb sources
step trustdb status
trustdb status
echo
echo "demo: OK (database: $TRUSTDB_DB)"
