#!/usr/bin/env bash
# elip_pruned_4m_vitb16: see the config's header. NNODES/NPROC_PER_NODE/NODE_RANK/MASTER_ADDR/MASTER_PORT from the env.
exec bash "$(dirname "$0")/torchrun.sh" configs/elip_pruned_4m_vitb16.yaml "$@"
