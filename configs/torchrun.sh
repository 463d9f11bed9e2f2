#!/usr/bin/env bash
# Shared launcher: torchrun the trainer on one node or many, from the environment.
#   NNODES (1) NPROC_PER_NODE (GPUs on this node, or 1) NODE_RANK (0) MASTER_ADDR (127.0.0.1) MASTER_PORT (29500)
# Usage: bash configs/torchrun.sh configs/<name>.yaml [key=value ...]
set -euo pipefail
cd "$(dirname "$0")/.."
config=$1; shift
gpus=$(python -c "import torch; print(torch.cuda.device_count())" 2>/dev/null || echo 0)
exec "${PYTHON:-.venv/bin/python}" -m torch.distributed.run \
    --nnodes "${NNODES:-1}" --nproc_per_node "${NPROC_PER_NODE:-$(( gpus > 0 ? gpus : 1 ))}" \
    --node_rank "${NODE_RANK:-0}" --master_addr "${MASTER_ADDR:-127.0.0.1}" --master_port "${MASTER_PORT:-29500}" \
    -m train.main --config "$config" "$@"
