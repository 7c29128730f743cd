#!/usr/bin/env bash
# One node's search worker (tools/slurm/search.sbatch runs it on every node): tools/search_net.py
# on the study at D2KD_SEARCH_STORAGE, named after its node (D2KD_SEARCH_HOST, default SLURM's
# node name), writing SEARCH_OUTPUT/<node>. Arguments: search_net.py's, without --storage and
# --output. SEARCH_NET replaces the search command (the tests' stand-in whose trials sleep).
set -euo pipefail
: "${D2KD_SEARCH_STORAGE:?the search database, e.g. postgresql://USER:PASSWORD@HOST:5432/DB}"
: "${SEARCH_OUTPUT:?the folder under which each node writes its own output}"
export D2KD_SEARCH_HOST=${D2KD_SEARCH_HOST:-${SLURMD_NODENAME:-$(hostname)}}
exec "${PYTHON:-python}" "${SEARCH_NET:-$(dirname "$0")/../search_net.py}" \
    --storage "$D2KD_SEARCH_STORAGE" --output "$SEARCH_OUTPUT/$D2KD_SEARCH_HOST" "$@"
