#!/usr/bin/env bash
# README command 2: set everything up (first time) and run the whole test suite.
# FT_REQUIRE_SLURM=1 makes the real-Slurm tests fail (not skip) when no cluster can be started.
# Extra arguments go to pytest, e.g. `bash tests/run.sh -k zero`.
set -euo pipefail
cd "$(dirname "$0")/.."
bash .ci/setup-venv
export PATH="$PWD/.venv/bin:$PATH" HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TRANSFORMERS_OFFLINE=1
exec .venv/bin/python -m pytest -ra -m "not gpu" "$@"
