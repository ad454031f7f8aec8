#!/usr/bin/env bash
# Regenerate packaging/requirements.lock from the names in it (or new pins given as arguments):
# download each wheel for CPython 3.11 / x86_64 and record its SHA-256.
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
work=$(mktemp -d); trap 'rm -rf "$work"' EXIT
mapfile -t pins < <(if [ $# -gt 0 ]; then printf '%s\n' "$@"; else
  grep -vE '^\s*(#|$)' "$here/requirements.lock" | cut -d' ' -f1; fi)
python3 -m pip download -q -d "$work" --no-deps --only-binary=:all: --python-version 3.11 \
  --implementation cp --abi cp311 --platform manylinux_2_17_x86_64 \
  --platform manylinux2014_x86_64 --platform manylinux_2_28_x86_64 --platform manylinux_2_34_x86_64 \
  --platform any "${pins[@]}"
{
  sed -n '1,/^# Regenerate/p' "$here/requirements.lock"
  for w in "$work"/*.whl; do
    n=$(basename "$w"); name=$(echo "$n" | cut -d- -f1 | tr _ - | tr '[:upper:]' '[:lower:]')
    echo "$name==$(echo "$n" | cut -d- -f2) --hash=sha256:$(sha256sum "$w" | cut -d' ' -f1)"
  done
} > "$here/requirements.lock.new"
mv "$here/requirements.lock.new" "$here/requirements.lock"
