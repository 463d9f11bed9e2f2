#!/usr/bin/env bash
# CLIP baseline on CC3M. NNODES/NPROC_PER_NODE/NODE_RANK/MASTER_ADDR/MASTER_PORT from the env.
exec bash "$(dirname "$0")/torchrun.sh" configs/clip_cc3m.yaml "$@"
