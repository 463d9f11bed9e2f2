#!/usr/bin/env bash
# ALIP paper setting on YFCC15M. NNODES/NPROC_PER_NODE/NODE_RANK/MASTER_ADDR/MASTER_PORT from the env.
exec bash "$(dirname "$0")/torchrun.sh" configs/alip_yfcc15m_vitb32.yaml "$@"
