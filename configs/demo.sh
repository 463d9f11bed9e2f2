#!/usr/bin/env bash
# The CPU demo config under torchrun (2 gloo processes by default on a CPU machine).
NPROC_PER_NODE=${NPROC_PER_NODE:-1} exec bash "$(dirname "$0")/torchrun.sh" configs/demo.yaml "$@"
