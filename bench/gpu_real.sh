#!/usr/bin/env bash
# One device call for the GPU runs on real weights, the GGUF models already under $MINIRT_MODELS
# (no registry is reachable there): the generate/engine tests, generate() tok/s of full, the
# default, whole pages and certified int8-threshold (bench/generate.py --model), then FRONTIER's
# certified int8 rows through the Triton kernels (bench/frontier.py); `tail`: the threshold's tail
# estimate on the GPU (its kernel tests, one layer at 128K/1M, generate() and FRONTIER's rows);
# `threshold`, `threshold-qwen`: the certified int8 rows of FRONTIER's oracle table (ranked at every
# eps, threshold at 0.1 and 1e-2 with and without the tail) on both models, one layer at 128K/1M
# and generate() on Qwen (INT8_ROWS=... picks other rows); `threshold-gen`: generate() on SmolLM2.
# Usage (on the GPU machine): bash bench/gpu_real.sh OUT_DIR [generate|frontier|tail|tail-frontier|threshold|threshold-qwen|threshold-gen]...
set -uo pipefail
out=${1:?OUT_DIR}; shift
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
tail_systems="minirt full;minirt certified (int8-threshold, eps=1e-2, W=128);minirt certified (int8-threshold, eps=3e-2, W=128, tail)"
int8_rows=${INT8_ROWS:-'certified int8 eps=;threshold eps=0.1;threshold eps=0.01'}  # the oracle table's certified int8 rows
SYSTEMS="minirt full;minirt sparse (default: exact, k=32, W=512);minirt sparse (whole pages, k=1024, W=512);minirt certified (int8-threshold, eps=1e-2, W=128)"
threshold_tests() {  # the threshold's, tail's and graph's kernel and engine tests, their summary into $1
  timeout 200 python3 -m pytest -q -p no:cacheprovider tests/test_engine.py tests/test_kernels.py \
    -k "tail or threshold or filtered or runtime or graph" 2>&1 | grep -E "FAILED|ERROR|passed|failed|error" | tail -8 | tee "$1"
}
for stage in "${@:-generate frontier}"; do
  case $stage in
    generate)
      timeout 150 python3 -m pytest -q -x -p no:cacheprovider tests/test_generate.py tests/test_engine.py 2>&1 | tail -5 | tee "$out/tests.txt"
      timeout 180 python3 bench/generate.py --model smollm2-135m --contexts 2048,8192 --transformers '' --compiled '' \
        --systems "$SYSTEMS" --out "$out/gen_smollm2" 2>&1 | grep -v -i warn | tail -14
      timeout 220 python3 bench/generate.py --model qwen2.5-coder-0.5b --contexts 8192,32768 --transformers '' --compiled '' \
        --systems "$SYSTEMS" --out "$out/gen_qwen" 2>&1 | grep -v -i warn | tail -14 ;;
    frontier)
      timeout 330 python3 bench/frontier.py run --model qwen2.5-coder-0.5b --lengths 32768 --device cuda \
        --only 'certified int8' --json "$out/frontier-qwen-32k-int8.json" 2>&1 | grep -v -i warn | tail -12
      timeout 200 python3 bench/frontier.py run --model smollm2-135m --lengths 8192 --device cuda \
        --only 'int8 threshold' --json "$out/frontier-smollm2-8k-threshold-gpu.json" 2>&1 | grep -v -i warn | tail -6 ;;
    tail)
      threshold_tests "$out/tail_tests.txt"
      timeout 120 python3 bench/attention.py --contexts 131072,1048576 --only threshold --out "$out/attention_tail" \
        2>&1 | grep -i threshold | tail -16
      timeout 150 python3 bench/generate.py --model smollm2-135m --contexts 8192 --transformers '' --compiled '' \
        --systems "$tail_systems" --out "$out/gen_smollm2_tail" 2>&1 | grep -v -i warn | tail -6
      timeout 150 python3 bench/generate.py --model qwen2.5-coder-0.5b --contexts 32768 --transformers '' --compiled '' \
        --systems "$tail_systems" --out "$out/gen_qwen_tail" 2>&1 | grep -v -i warn | tail -6 ;;
    tail-frontier)
      only='threshold eps=0.1;threshold eps=0.03;threshold eps=0.01 + tail;threshold eps=0.001 + tail'
      timeout 280 python3 bench/frontier.py run --model smollm2-135m --lengths 2048,4096,8192 --device cuda \
        --only "$only" --json "$out/frontier-smollm2-threshold-tail.json" 2>&1 | grep -v -i warn | tail -4
      timeout 300 python3 bench/frontier.py run --model qwen2.5-coder-0.5b --lengths 8192,32768 --device cuda \
        --only "$only" --json "$out/frontier-qwen-threshold-tail.json" 2>&1 | grep -v -i warn | tail -4 ;;
    threshold)  # the oracle table's certified int8 rows on SmolLM2, one layer's cost
      threshold_tests "$out/threshold_tests.txt"
      timeout 120 python3 bench/attention.py --contexts 131072,1048576 --only threshold --out "$out/attention_threshold" \
        2>&1 | grep -i threshold | tail -16
      timeout 300 python3 bench/frontier.py run --model smollm2-135m --lengths 2048,4096,8192 --device cuda \
        --only "$int8_rows" --json "$out/frontier-smollm2-int8.json" 2>&1 | grep -v -i warn | tail -4 ;;
    threshold-qwen)
      timeout 420 python3 bench/frontier.py run --model qwen2.5-coder-0.5b --lengths 8192,32768 --device cuda \
        --only "$int8_rows" --json "$out/frontier-qwen-int8.json" 2>&1 | grep -v -i warn | tail -4
      timeout 150 python3 bench/generate.py --model qwen2.5-coder-0.5b --contexts 32768 --transformers '' --compiled '' \
        --systems "$tail_systems" --out "$out/gen_qwen_threshold" 2>&1 | grep -v -i warn | tail -6 ;;
    threshold-gen)
      timeout 150 python3 bench/generate.py --model smollm2-135m --contexts 8192 --transformers '' --compiled '' \
        --systems "$tail_systems" --out "$out/gen_smollm2_threshold" 2>&1 | grep -v -i warn | tail -6 ;;
  esac
done
