#!/usr/bin/env bash
# Build build/rpm/trustdb-VERSION-1.x86_64.rpm with rpmbuild from the staged Fedora tree
# (packaging/stage.sh --layout fedora). Usage: packaging/rpm/build.sh [--wheel FILE] [OUTDIR]
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
top=$(cd "$here/../.." && pwd)
wheel=()
if [ "${1:-}" = --wheel ]; then wheel=(--wheel "$2"); shift 2; fi
out=${1:-$top/build/rpm}
version=$(sed -n 's/^version = "\(.*\)"/\1/p' "$top/pyproject.toml")
work="$out/work"
rm -rf "$work"; mkdir -p "$work/SOURCES"
bash "$top/packaging/stage.sh" --layout fedora --dest "$work/root" "${wheel[@]}"
tar -C "$work/root" --owner=0 --group=0 -cf "$work/SOURCES/trustdb-root.tar" .
rpmbuild -bb --quiet --define "_topdir $work" --define "_sourcedir $work/SOURCES" \
  --define "_rpmdir $out" --define "_build_name_fmt %%{NAME}-%%{VERSION}-%%{RELEASE}.%%{ARCH}.rpm" \
  --define "trustdb_version $version" --define "_dbpath /usr/lib/sysimage/rpm" \
  "$here/trustdb.spec" >/dev/null
rm -rf "$work"
echo "$out/trustdb-$version-1.x86_64.rpm"
