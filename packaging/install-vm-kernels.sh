#!/usr/bin/env bash
# Install the stock Debian kernels the BPF LSM test tier boots in QEMU (tests/vm):
#   6.1  = linux-image-amd64 (bookworm; listed in apt-packages.txt)
#   6.12 = linux-image-6.12.95+deb12-amd64 (bookworm-backports, named explicitly: `-t
#          bookworm-backports` would also upgrade bpftool and headers).
# Installing a kernel package only adds files under /boot and /lib/modules; it does not change how
# this machine boots. Idempotent: a second run installs nothing and touches no apt source.
set -euo pipefail

k612=linux-image-6.12.95+deb12-amd64
installed() { dpkg-query -W -f='${Status}' "$1" 2>/dev/null | grep -q 'install ok installed'; }

if installed "$k612"; then
  exit 0
fi

# bookworm-backports is not in a fresh machine's sources: add it with the same mirror and keyring
# as the main Debian stanza of debian.sources (the first stanza whose Suites include bookworm).
src=/etc/apt/sources.list.d/debian.sources
bp=/etc/apt/sources.list.d/trustdb-bookworm-backports.sources
if [ ! -e "$bp" ]; then
  uris=http://deb.debian.org/debian
  signed=/usr/share/keyrings/debian-archive-keyring.gpg
  if [ -r "$src" ]; then
    stanza=$(awk 'BEGIN{RS=""} /Suites:[^\n]*bookworm( |$|\n)/ && !/security/ {print; exit}' "$src")
    u=$(printf '%s\n' "$stanza" | sed -n 's/^URIs:[[:space:]]*//p' | head -1)
    s=$(printf '%s\n' "$stanza" | sed -n 's/^Signed-By:[[:space:]]*//p' | head -1)
    [ -n "$u" ] && uris=$u
    [ -n "$s" ] && signed=$s
  fi
  printf 'Types: deb\nURIs: %s\nSuites: bookworm-backports\nComponents: main\nSigned-By: %s\n' \
    "$uris" "$signed" >"$bp"
  echo "install-vm-kernels: added $bp ($uris)"
fi

apt-get update -q
DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends "$k612"
