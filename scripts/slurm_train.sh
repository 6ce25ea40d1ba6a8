#!/bin/bash
# Multi-node DDP training under SLURM: one task per GPU, Lightning reads the SLURM environment
# (SLURM_NTASKS, SLURM_PROCID, SLURM_LOCALID, SLURM_NODELIST -> MASTER_ADDR, job id -> MASTER_PORT).
#
#   sbatch --nodes=2 --gpus-per-node=4 --ntasks-per-node=4 \
#       scripts/slurm_train.sh configs/coco.yaml --config configs/yolov8s-sta.yaml [more CLI args]
#
# --ntasks-per-node must equal --gpus-per-node (Lightning checks that the task count matches devices x nodes).
# W&B: export WANDB_API_KEY (or `wandb login` once on a login node) for online runs; without a key, or with
# WANDB_MODE=offline, the run is written offline and the `wandb sync ...` command is printed at the end.
#SBATCH --job-name=sta-lightning
#SBATCH --nodes=1
#SBATCH --gpus-per-node=1
#SBATCH --ntasks-per-node=1
#SBATCH --cpus-per-task=8
#SBATCH --time=24:00:00
#SBATCH --signal=SIGUSR1@90
# (SIGUSR1 90 s before the time limit: Lightning saves a checkpoint and requeues the job.)
set -euo pipefail

CONFIG=${1:?usage: sbatch scripts/slurm_train.sh CONFIG.yaml [extra LightningCLI args]}
shift

export NO_ALBUMENTATIONS_UPDATE=1
# Every rank reads its GPU count from SLURM; the CLI is told the same layout explicitly.
srun python -m sta_lightning fit \
    --config "$CONFIG" \
    --trainer.accelerator gpu \
    --trainer.devices "${SLURM_NTASKS_PER_NODE}" \
    --trainer.num_nodes "${SLURM_NNODES}" \
    --trainer.strategy ddp \
    "$@"
