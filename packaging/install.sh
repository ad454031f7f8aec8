#!/usr/bin/env bash
# Install trustdb system-wide from this source tree:
#   - the Python package into its own virtual environment (/usr/lib/trustdb/venv), with
#     /usr/bin/trustdb pointing at it
#   - the BPF objects (built by `make bpf`) into /usr/lib/trustdb/bpf
#   - the systemd unit (installed DISABLED: enforcing on the whole machine is a person's decision)
#   - the package-manager hooks that keep the database in step with dpkg / dnf
# Usage: packaging/install.sh [--destdir DIR] [--no-python]
#   --destdir DIR   stage everything under DIR (for packagers and tests)
#   --no-python     skip the virtual environment (files and hooks only)
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
top=$(cd "$here/.." && pwd)
destdir=""
python=1
while [ $# -gt 0 ]; do
  case "$1" in
    --destdir) destdir=${2:?--destdir needs a directory}; shift 2 ;;
    --no-python) python=0; shift ;;
    *) echo "install.sh: unknown option $1" >&2; exit 2 ;;
  esac
done

lib="$destdir/usr/lib/trustdb"
# abi_check.bpf.o only exists for the ABI test; everything else is a backend.
objs=()
for o in "$top"/build/bpf/*.bpf.o; do [ "${o##*/}" = abi_check.bpf.o ] || objs+=("$o"); done
if [ ! -e "${objs[0]}" ]; then
  echo "install.sh: no BPF objects in build/bpf: run 'make bpf' first" >&2
  exit 1
fi
install -d -m 0755 "$lib/bpf" "$destdir/usr/bin" "$destdir/etc/systemd/system" \
  "$destdir/etc/default" "$destdir/var/lib/trustdb" "$destdir/var/log/trustdb"
install -m 0644 "${objs[@]}" "$lib/bpf/"
install -m 0644 "$here/trustdb.service" "$destdir/etc/systemd/system/trustdb.service"
[ -e "$destdir/etc/default/trustdb" ] || printf '%s\n' \
  '# trustdb service settings. Start in audit mode, read `trustdb log`, then switch to enforce.' \
  'TRUSTDB_MODE=audit' > "$destdir/etc/default/trustdb"
chmod 0700 "$destdir/var/lib/trustdb"

# Keep the database in step with the package manager that this machine has.
if [ -d "$destdir/etc/apt/apt.conf.d" ] || command -v dpkg >/dev/null 2>&1; then
  install -D -m 0644 "$here/hooks/apt/80trustdb" "$destdir/etc/apt/apt.conf.d/80trustdb"
fi
if command -v dnf >/dev/null 2>&1; then
  install -D -m 0644 "$here/hooks/dnf/trustdb.actions" \
    "$destdir/etc/dnf/plugins/post-transaction-actions.d/trustdb.action"
fi

if [ "$python" = 1 ]; then
  python3 -m venv "$lib/venv"
  "$lib/venv/bin/pip" install -q --disable-pip-version-check "$top"
  ln -sf /usr/lib/trustdb/venv/bin/trustdb "$destdir/usr/bin/trustdb"
fi
echo "trustdb installed${destdir:+ under $destdir}. Next: trustdb import deb (or rpm), then"
echo "  systemctl start trustdb (audit mode; see /etc/default/trustdb), trustdb log --follow"
