#!/usr/bin/env bash
# Build build/deb/trustdb_VERSION_amd64.deb with dpkg-deb from the staged FHS tree
# (packaging/stage.sh --layout debian). Usage: packaging/deb/build.sh [--wheel FILE] [OUTDIR]
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
top=$(cd "$here/../.." && pwd)
wheel=()
if [ "${1:-}" = --wheel ]; then wheel=(--wheel "$2"); shift 2; fi
out=${1:-$top/build/deb}
version=$(sed -n 's/^version = "\(.*\)"/\1/p' "$top/pyproject.toml")
root="$out/root"
mkdir -p "$out"
bash "$top/packaging/stage.sh" --layout debian --dest "$root" "${wheel[@]}"
install -d -m 0755 "$root/DEBIAN"
sed -e "s/@VERSION@/$version/" -e "s/@SIZE@/$(du -sk --exclude=DEBIAN "$root" | cut -f1)/" \
  "$here/control.in" > "$root/DEBIAN/control"
install -m 0755 "$here/postinst" "$here/prerm" "$here/postrm" "$root/DEBIAN/"
(cd "$root" && find etc -type f | sed 's|^|/|' | sort) > "$root/DEBIAN/conffiles"
(cd "$root" && find . -path ./DEBIAN -prune -o -type f -print0 | sed -z 's|^\./||' | sort -z |
  xargs -0 md5sum) > "$root/DEBIAN/md5sums"
deb="$out/trustdb_${version}_amd64.deb"
dpkg-deb --root-owner-group -Zgzip --build "$root" "$deb" >/dev/null
rm -rf "$root"
echo "$deb"
