#!/usr/bin/env bash
# Generate trustdb.1 from the CLI itself with help2man: the top-level --help and --version,
# plus one section per verb from that verb's --help (typer's plain, non-rich output).
# Usage: packaging/man.sh PYTHON OUTDIR   (PYTHONPATH must reach the trustdb to document)
set -euo pipefail
python=${1:?python}; outdir=${2:?outdir}
work=$(mktemp -d); trap 'rm -rf "$work"' EXIT
cli="$work/trustdb"
printf '#!/bin/sh\nTYPER_USE_RICH=0 COLUMNS=80 exec %s -c "from trustdb.cli import main; main()" "$@"\n' \
  "$python" > "$cli"
chmod +x "$cli"
verbs=$("$cli" --help | awk '/^Commands:/{on=1; next} on && /^  [a-z]/{print $1}')
{
  echo "[VERBS]"
  for verb in $verbs; do
    for sub in $("$cli" "$verb" --help | awk '/^Commands:/{on=1; next} on && /^  [a-z]/{print $1}'); do
      verbs_sub+=" $verb:$sub"
    done
    echo ".SS trustdb $verb"
    "$cli" "$verb" --help | sed -e '1,/^$/d' -e 's/^\./\\\&./' -e 's/^/ /' | sed '1s/^ //' | \
      awk 'BEGIN{print ".nf"} {print} END{print ".fi"}'
  done
  echo "[FILES]"
  echo ".TP"; echo "/var/lib/trustdb"; echo "The trust database (LMDB)."
  echo ".TP"; echo "/var/log/trustdb/decisions.jsonl"; echo "The decision log read by trustdb log."
  echo ".TP"; echo "/usr/lib/trustdb/python/trustdb/bpf"; echo "The CO-RE BPF objects."
  echo "[ENVIRONMENT]"
  echo ".TP"; echo "TRUSTDB_DB"; echo "The trust database directory (--db)."
  echo ".TP"; echo "TRUSTDB_BPF_DIR"; echo "Load the BPF objects from this directory instead (tests, a build tree)."
} > "$work/include"
help2man --no-info --section 1 --name "allowlist for executable code, enforced in the kernel" \
  --include "$work/include" --output "$outdir/trustdb.1" "$cli"
