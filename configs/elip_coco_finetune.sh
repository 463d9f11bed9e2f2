#!/usr/bin/env bash
# elip_coco_finetune: see the config's header. NNODES/NPROC_PER_NODE/NODE_RANK/MASTER_ADDR/MASTER_PORT from the env.
exec bash "$(dirname "$0")/torchrun.sh" configs/elip_coco_finetune.yaml "$@"
