#!/usr/bin/env bash
# One device call for the decode engine: environment, the kernel and engine tests compiled on the
# GPU (graph == eager, no host sync inside a step), then bench/generate.py (minirt rows, or the
# rows named by the extra arguments).
# Usage (on the GPU machine): bash bench/gpu_engine.sh OUT_DIR [bench/generate.py args...]
set -uo pipefail
out=${1:?OUT_DIR}; shift
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
python3 -c "import torch, triton, transformers; print('torch', torch.__version__, 'triton', triton.__version__, 'transformers', transformers.__version__)"
if [ -z "${SKIP_TESTS:-}" ]; then
  timeout 300 python3 -m pytest -q -x -p no:cacheprovider tests/test_engine.py tests/test_kernels.py \
    -k "not every_path and not sampled_generation and not read_once" 2>&1 | tail -25 | tee "$out/tests.txt"
fi
timeout 420 python3 bench/generate.py --out "$out/generate" "$@" 2>&1 | grep -v -i "warn" | tee "$out/generate_log.txt"
