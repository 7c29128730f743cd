#!/usr/bin/env bash
# One node's part of a multi-node training (tools/slurm/train.sbatch runs it on every node):
# tools/train_net.py with GPUS_PER_NODE processes as machine rank SLURM_NODEID of SLURM_NNODES,
# meeting the other machines at tcp://MASTER_ADDR:MASTER_PORT. Arguments: train_net.py's.
set -euo pipefail
: "${SLURM_NNODES:?}" "${SLURM_NODEID:?}" "${MASTER_ADDR:?}" "${MASTER_PORT:?}"
exec "${PYTHON:-python}" "$(dirname "$0")/../train_net.py" \
    --num-gpus "${GPUS_PER_NODE:-${SLURM_GPUS_ON_NODE:-1}}" \
    --num-machines "$SLURM_NNODES" --machine-rank "$SLURM_NODEID" \
    --dist-url "tcp://$MASTER_ADDR:$MASTER_PORT" "$@"
