#!/usr/bin/env bash
# Install trustdb system-wide from this source tree, without a package manager (the .deb and
# .rpm are the packaged way: make deb, make rpm):
#   - the Python package and its dependencies at the versions pinned (with hashes) in
#     packaging/requirements.lock, vendored into /usr/lib/trustdb/python, run by the system's
#     python3.11 through /usr/bin/trustdb (packaging/stage.sh: the same tree the .deb installs)
#   - the BPF objects (built by `make bpf`) into /usr/lib/trustdb/bpf
#   - the systemd unit (installed DISABLED: enforcing on the whole machine is a person's decision)
#   - the package-manager hooks that keep the database in step with dpkg / dnf
# Every file installed is listed in /usr/lib/trustdb/installed-files, which --uninstall reads.
# Usage: packaging/install.sh [--destdir DIR] [--no-python]
#        packaging/install.sh --uninstall [--purge] [--destdir DIR]
#   --destdir DIR   stage everything under DIR (for packagers and tests)
#   --no-python     skip the Python tree (files and hooks only)
#   --uninstall     remove what an install listed; --purge also removes the database and log
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
top=$(cd "$here/.." && pwd)
destdir="" python=1 uninstall=0 purge=0
while [ $# -gt 0 ]; do
  case "$1" in
    --destdir) destdir=${2:?--destdir needs a directory}; shift 2 ;;
    --no-python) python=0; shift ;;
    --uninstall) uninstall=1; shift ;;
    --purge) purge=1; shift ;;
    *) echo "install.sh: unknown option $1" >&2; exit 2 ;;
  esac
done
lib="$destdir/usr/lib/trustdb"
manifest="$lib/installed-files"

if [ "$uninstall" = 1 ]; then
  if [ ! -f "$manifest" ] && [ "$purge" = 0 ]; then
    echo "install.sh: nothing to uninstall ($manifest missing)" >&2; exit 1
  fi
  if [ -z "$destdir" ] && [ -d /run/systemd/system ]; then
    systemctl disable --now trustdb.service >/dev/null 2>&1 || true
  fi
  if [ -f "$manifest" ]; then
    while IFS= read -r f; do rm -f "$destdir$f"; done < "$manifest"
  fi
  # Directories the install made, deepest first, if nothing else lives in them.
  find "$lib" -depth -type d -empty -delete 2>/dev/null || true
  if [ "$purge" = 1 ]; then rm -rf "$destdir/var/lib/trustdb" "$destdir/var/log/trustdb"; fi
  echo "trustdb uninstalled${destdir:+ from $destdir}$([ "$purge" = 1 ] && echo ', database and log removed')"
  exit 0
fi

# abi_check.bpf.o only exists for the ABI test; everything else is a backend.
objs=()
for o in "$top"/build/bpf/*.bpf.o; do [ "${o##*/}" = abi_check.bpf.o ] || objs+=("$o"); done
if [ ! -e "${objs[0]}" ]; then
  echo "install.sh: no BPF objects in build/bpf: run 'make bpf' first" >&2
  exit 1
fi
install -d -m 0755 "$lib/bpf" "$destdir/usr/bin" "$destdir/etc/systemd/system" \
  "$destdir/etc/default" "$destdir/var/log/trustdb"
install -d -m 0700 "$destdir/var/lib/trustdb"
install -m 0644 "${objs[@]}" "$lib/bpf/"
install -m 0644 "$here/trustdb.service" "$destdir/etc/systemd/system/trustdb.service"
[ -e "$destdir/etc/default/trustdb" ] || printf '%s\n' \
  '# trustdb service settings. Start in audit mode, read `trustdb log`, then switch to enforce.' \
  'TRUSTDB_MODE=audit' > "$destdir/etc/default/trustdb"
files=(/etc/systemd/system/trustdb.service /etc/default/trustdb)
for o in "${objs[@]}"; do files+=("/usr/lib/trustdb/bpf/${o##*/}"); done

# Keep the database in step with the package manager that this machine has.
if [ -d "$destdir/etc/apt/apt.conf.d" ] || command -v dpkg >/dev/null 2>&1; then
  install -D -m 0644 "$here/hooks/apt/80trustdb" "$destdir/etc/apt/apt.conf.d/80trustdb"
  # The trusted-installer window around every dpkg run (trustdb.service.installers).
  install -D -m 0644 "$here/hooks/dpkg/trustdb" "$destdir/etc/dpkg/dpkg.cfg.d/trustdb"
  files+=(/etc/apt/apt.conf.d/80trustdb /etc/dpkg/dpkg.cfg.d/trustdb)
fi
if command -v dnf5 >/dev/null 2>&1; then
  install -D -m 0644 "$here/hooks/dnf/trustdb-dnf5.actions" \
    "$destdir/etc/dnf/libdnf5-plugins/actions.d/trustdb.actions"
  files+=(/etc/dnf/libdnf5-plugins/actions.d/trustdb.actions)
elif command -v dnf >/dev/null 2>&1 && plugins=$(python3 -c 'import dnf, os; print(os.path.join(os.path.dirname(os.path.dirname(dnf.__file__)), "dnf-plugins"))' 2>/dev/null); then
  # dnf4: a plugin (dnf is a python process with librpm inside: the window names its pid).
  install -D -m 0644 "$here/hooks/dnf4/trustdb.py" "$destdir$plugins/trustdb.py"
  install -D -m 0644 "$here/hooks/dnf4/trustdb.conf" "$destdir/etc/dnf/plugins/trustdb.conf"
  files+=("$plugins/trustdb.py" /etc/dnf/plugins/trustdb.conf)
fi

if [ "$python" = 1 ]; then
  stage=$(mktemp -d); trap 'rm -rf "$stage"' EXIT
  bash "$here/stage.sh" --layout debian --dest "$stage/root"
  cp -a "$stage/root/usr/lib/trustdb/python" "$lib/"
  install -m 0755 "$stage/root/usr/bin/trustdb" "$destdir/usr/bin/trustdb"
  install -D -m 0644 "$stage/root/usr/share/man/man1/trustdb.1.gz" \
    "$destdir/usr/share/man/man1/trustdb.1.gz"
  files+=(/usr/bin/trustdb /usr/share/man/man1/trustdb.1.gz)
  while IFS= read -r f; do files+=("${f#"$destdir"}"); done < <(find "$lib/python" -type f)
fi
printf '%s\n' "${files[@]}" /usr/lib/trustdb/installed-files \
  /usr/lib/trustdb/installed-files.sha256 > "$manifest"
# The digests of what was installed, for `trustdb service trust-self` (files outside the Python
# tree, whose wheel RECORDs it verifies).
for f in "${files[@]}"; do
  case "$f" in /usr/lib/trustdb/python/*|/etc/*) ;; *) (cd "$destdir/" && sha256sum "${f#/}") ;; esac
done | sed 's|  |  /|' > "$lib/installed-files.sha256"
# trustdb's own install as a trust source (`trustdb sources`: self:trustdb), verified against
# those digests, so that the service never denies trustdb itself.
if [ "$python" = 1 ] && [ -z "$destdir" ]; then
  /usr/bin/trustdb service trust-self --quiet || echo "install.sh: trust-self failed" >&2
fi
echo "trustdb installed${destdir:+ under $destdir}. Next: trustdb import deb (or rpm), then"
echo "  systemctl start trustdb (audit mode; see /etc/default/trustdb), trustdb log --follow"
echo "  (remove: packaging/install.sh --uninstall [--purge])"
