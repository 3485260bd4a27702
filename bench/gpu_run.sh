#!/usr/bin/env bash
# One device call: environment, kernel tests on the GPU (compiled, not interpreted), the attention
# benchmark, and per-kernel profiles of the page-selection step with both summary dtypes.
# Usage (on the GPU machine): bash bench/gpu_run.sh OUT_DIR [bench/attention.py args...]
set -uo pipefail
out=${1:?OUT_DIR}; shift
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)"
python3 -m pytest -q -p no:cacheprovider tests/test_kernels.py 2>&1 | tail -5 | tee "$out/kernel_tests.txt"
python3 bench/attention.py --out "$out/attention" "$@" 2>&1 | tee "$out/attention_log.txt"
for summary in cache fp8; do
  python3 bench/profile_step.py --selection pages --summary-dtype $summary 2>&1 | grep -v -i warn | tee -a "$out/profile_log.txt"
done
