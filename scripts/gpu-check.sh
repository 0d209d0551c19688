#!/usr/bin/env bash
# One prepared command for a machine with an NVIDIA GPU (well inside ten minutes):
# SFT-Demo and GRPO-Demo through a real worker, LOAD_IN_4BIT true and false, step times and
# peak GPU memory as JSON, and a check that each job's GPU memory is freed when it ends.
# With two or more GPUs, also a 2-device job under DDP and one under FSDP (worker --gpus 0,1).
# On a machine without CUDA it prints that it was skipped.
# Needs the package with its train and gpu extras: pip install -e '.[train,gpu]'
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
[ -x .venv/bin/python ] && PY=.venv/bin/python
exec timeout 540 "$PY" scripts/gpu_check.py
