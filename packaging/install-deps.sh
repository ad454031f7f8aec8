#!/usr/bin/env bash
# Install what trustdb needs on a fresh Debian 12 machine: Debian packages, then the Python
# package itself (editable) with its test extras. Idempotent: a second run installs nothing.
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
top=$(cd "$here/.." && pwd)

mapfile -t pkgs < <(grep -vE '^\s*(#|$)' "$here/apt-packages.txt")
missing=()
for p in "${pkgs[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q 'install ok installed' || missing+=("$p")
done
if [ ${#missing[@]} -gt 0 ]; then
  echo "install-deps: apt-get install ${missing[*]}"
  apt-get update -q
  DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends "${missing[@]}"
fi

# The 6.12 kernel for the VM tier comes from bookworm-backports (its own script: adds the suite).
bash "$here/install-vm-kernels.sh"

python3 -m pip install -q --disable-pip-version-check -e "$top[test]"
