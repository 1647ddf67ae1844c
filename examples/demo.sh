#!/usr/bin/env bash
# README command 1: set everything up (first time) and fine-tune the tiny demo model on 2 CPU ranks
# through the deepspeed launcher. Extra arguments are key=value overrides, e.g. train.max_steps=60.
set -euo pipefail
cd "$(dirname "$0")/.."
bash .ci/setup-venv
export PATH="$PWD/.venv/bin:$PATH" OMP_NUM_THREADS=${OMP_NUM_THREADS:-1} HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1
RUN_DIR=${RUN_DIR:-runs/tiny-sft-$(date +%Y%m%d-%H%M%S)}
exec deepspeed --num_gpus 2 trainer/main.py --config examples/tiny-sft.yaml run_dir="$RUN_DIR" "$@"
