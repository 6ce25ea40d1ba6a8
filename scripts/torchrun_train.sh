#!/bin/bash
# DDP training launched with torchrun (Lightning reads torchrun's environment: RANK, LOCAL_RANK, WORLD_SIZE,
# MASTER_ADDR, MASTER_PORT).
#
# One machine, 4 GPUs:
#   scripts/torchrun_train.sh configs/coco.yaml --config configs/yolov8s-sta.yaml
# Two machines (run the same command on each; HEAD_NODE = hostname or IP of one of them):
#   NNODES=2 RDZV_ENDPOINT=HEAD_NODE:29500 scripts/torchrun_train.sh configs/coco.yaml --config configs/yolov8s-sta.yaml
# Extra arguments go to the LightningCLI, e.g. --trainer.max_epochs 100.
#
# Environment (defaults in brackets):
#   NNODES          number of machines [1]
#   RDZV_ENDPOINT   host:port of the c10d rendezvous, the same on every machine [localhost:29500]
#   ACCELERATOR     Lightning accelerator: gpu, or cpu for CPU processes that talk over gloo [gpu]
#   GPUS_PER_NODE   processes per machine, one per device [the GPUs that nvidia-smi lists]
# Rehearsal of 2 machines on one, with CPU processes (what tests/test_ddp_fit.py runs), in two shells:
#   NNODES=2 RDZV_ENDPOINT=127.0.0.1:29500 ACCELERATOR=cpu GPUS_PER_NODE=1 scripts/torchrun_train.sh CONFIG.yaml
set -euo pipefail

CONFIG=${1:?usage: scripts/torchrun_train.sh CONFIG.yaml [extra LightningCLI args]}
shift
NNODES=${NNODES:-1}
ACCELERATOR=${ACCELERATOR:-gpu}
GPUS_PER_NODE=${GPUS_PER_NODE:-$(nvidia-smi --list-gpus | wc -l)}
RDZV_ENDPOINT=${RDZV_ENDPOINT:-localhost:29500}

export NO_ALBUMENTATIONS_UPDATE=1
torchrun \
    --nnodes "$NNODES" \
    --nproc-per-node "$GPUS_PER_NODE" \
    --rdzv-backend c10d \
    --rdzv-endpoint "$RDZV_ENDPOINT" \
    -m sta_lightning fit \
    --config "$CONFIG" \
    --trainer.accelerator "$ACCELERATOR" \
    --trainer.devices "$GPUS_PER_NODE" \
    --trainer.num_nodes "$NNODES" \
    --trainer.strategy ddp \
    "$@"
