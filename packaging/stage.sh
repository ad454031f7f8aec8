#!/usr/bin/env bash
# Stage trustdb into an FHS tree, the one .deb, .rpm and install.sh all install:
#   /usr/bin/trustdb                         launcher: the system's python3.11, isolated (-I)
#   /usr/lib/trustdb/python/                 trustdb, trustdb_importers and the pinned
#                                            dependencies (requirements.lock), byte-compiled
#   /usr/lib/trustdb/python/trustdb/bpf/     the CO-RE BPF objects (built with the wheel)
#   <unit dir>/trustdb.service               installed, never enabled
#   /etc/default/trustdb                     TRUSTDB_MODE=audit
#   /usr/share/trustdb/policies/*.toml       the shipped policies (agent, build, workstation)
#   apt hook (debian) or dnf5 actions and the dnf4 plugin (fedora), the man page, README
# Usage: packaging/stage.sh --layout debian|fedora --dest DIR [--wheel FILE] [--python PY]
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
top=$(cd "$here/.." && pwd)
layout="" dest="" wheel="" python=""
while [ $# -gt 0 ]; do
  case "$1" in
    --layout) layout=${2:?}; shift 2 ;;
    --dest) dest=${2:?}; shift 2 ;;
    --wheel) wheel=${2:?}; shift 2 ;;
    --python) python=${2:?}; shift 2 ;;
    *) echo "stage.sh: unknown option $1" >&2; exit 2 ;;
  esac
done
case "$layout" in
  debian) unitdir=/lib/systemd/system; launcher_python=/usr/bin/python3 ;;
  fedora) unitdir=/usr/lib/systemd/system; launcher_python=/usr/bin/python3.11 ;;
  *) echo "stage.sh: --layout debian|fedora" >&2; exit 2 ;;
esac
[ -n "$dest" ] || { echo "stage.sh: --dest DIR" >&2; exit 2; }
# The interpreter that byte-compiles and generates the man page: Debian's own 3.11 when present.
python=${python:-$(command -v python3.11 || command -v python3)}

if [ -z "$wheel" ]; then
  out=$(mktemp -d); trap 'rm -rf "$out"' EXIT
  python3 -m build -q --wheel --outdir "$out" "$top" >/dev/null
  wheel=$(ls "$out"/trustdb-*.whl)
fi
lib="$dest/usr/lib/trustdb"
rm -rf "$dest"
install -d -m 0755 "$lib/python" "$dest/usr/bin" "$dest$unitdir" "$dest/etc/default" \
  "$dest/usr/share/man/man1" "$dest/usr/share/doc/trustdb"

# Dependencies exactly as pinned (hashes checked), as CPython 3.11 x86_64 wheels, then trustdb.
python3 -m pip install -q --disable-pip-version-check --no-compile --no-deps --require-hashes \
  --only-binary=:all: --python-version 3.11 --implementation cp --abi cp311 \
  --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 --platform manylinux_2_34_x86_64 \
  --platform manylinux_2_28_x86_64 --platform any \
  --target "$lib/python" -r "$here/requirements.lock"
python3 -m pip install -q --disable-pip-version-check --no-compile --no-deps \
  --target "$lib/python" "$wheel"
rm -rf "$lib/python/bin"   # console scripts of the dependencies (typer, pygmentize...)
ls "$lib/python/trustdb/bpf/"*.bpf.o >/dev/null

cat > "$dest/usr/bin/trustdb" <<LAUNCHER
#!$launcher_python -I
# trustdb launcher: isolated mode (-I: no PYTHONPATH, no user site, no script directory), so
# that what runs as root is only the packaged code in /usr/lib/trustdb/python.
import sys
sys.path.insert(0, "/usr/lib/trustdb/python")
from trustdb.cli import main
sys.exit(main())
LAUNCHER
chmod 0755 "$dest/usr/bin/trustdb"

# Byte-compile for the target interpreter with hashes that are never re-checked, so python never
# writes __pycache__ files that a package manager would not know about.
"$python" -m compileall -q -j 0 --invalidation-mode unchecked-hash -d /usr/lib/trustdb/python \
  "$lib/python" >/dev/null

install -m 0644 "$here/trustdb.service" "$dest$unitdir/trustdb.service"
printf '%s\n' \
  '# trustdb service settings. Start in audit mode, read `trustdb log`, then switch to enforce.' \
  'TRUSTDB_MODE=audit' > "$dest/etc/default/trustdb"
chmod 0644 "$dest/etc/default/trustdb"
if [ "$layout" = debian ]; then
  install -D -m 0644 "$here/hooks/apt/80trustdb" "$dest/etc/apt/apt.conf.d/80trustdb"
  install -D -m 0644 "$here/hooks/dpkg/trustdb" "$dest/etc/dpkg/dpkg.cfg.d/trustdb"
else
  install -D -m 0644 "$here/hooks/dnf/trustdb-dnf5.actions" \
    "$dest/etc/dnf/libdnf5-plugins/actions.d/trustdb.actions"
  # dnf4's plugin: linked into dnf's own plugin directory by the package's %post.
  install -D -m 0644 "$here/hooks/dnf4/trustdb.py" "$dest/usr/lib/trustdb/dnf4/trustdb.py"
  install -D -m 0644 "$here/hooks/dnf4/trustdb.conf" "$dest/etc/dnf/plugins/trustdb.conf"
fi
PYTHONPATH="$lib/python" bash "$here/man.sh" "$python" "$dest/usr/share/man/man1"
gzip -9n "$dest/usr/share/man/man1/trustdb.1"
install -m 0644 "$top/README.md" "$dest/usr/share/doc/trustdb/README.md"
install -d -m 0755 "$dest/usr/share/trustdb/policies"
install -m 0644 "$top"/policies/*.toml "$dest/usr/share/trustdb/policies/"
find "$dest" -exec touch -h -d @"${SOURCE_DATE_EPOCH:-0}" {} +
