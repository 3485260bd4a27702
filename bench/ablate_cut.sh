#!/usr/bin/env bash
# Where the sampled cut's time goes (GPU): triton_attention.sampled_cut timed alone (CUDA graph,
# 32K, fp16, eps 1e-2, peaked queries) as committed and with parts of its kernel removed by
# editing a copy of the source, restored after each row. Prints a Markdown table.
#   bash bench/ablate_cut.sh > results/ablate_cut.md
set -euo pipefail
kernel=minirt/kernels/triton_attention.py
saved=$(mktemp)
cp "$kernel" "$saved"
trap 'cp "$saved" "$kernel"' EXIT

time_cut() {  # us per launch at 14q/2kv and 32q/4kv; $1: SHIFT_SAMPLES (default the committed one)
  python3 - "$@" <<'EOF'
import sys
import triton
sys.path.insert(0, ".")
from bench.tune_cut import cut_launch
from minirt.kernels import reference
if len(sys.argv) > 1:
    reference.SHIFT_SAMPLES = int(sys.argv[1])
us = []
for Hq, Hkv in ((14, 2), (32, 4)):
    cut = cut_launch(Hq, Hkv, 32768)
    cut()  # compiled before the graph is captured
    us.append(f"{triton.testing.do_bench_cudagraph(cut, rep=200) * 1000:.1f}")
print(" | ".join(us))
EOF
}

row() {  # $1: the row's name; the kernel as edited before the call; $2: SHIFT_SAMPLES
  echo "| $1 | $(time_cut "${@:2}") |"
  cp "$saved" "$kernel"
}

echo "| sampled cut | 14q/2kv us | 32q/4kv us |"
echo "|---|---|---|"
row "as committed"
sed -i 's/for _ in tl.static_range(STEPS):/for _ in tl.static_range(0):/' "$kernel"
row "without the bisection (and the work only it uses)"
sed -i 's/for v0 in range(0, n_base, BT):/for v0 in range(0, 0, BT):/' "$kernel"
row "without the anchor and window"
row "on 256 samples" 256
row "on 128 samples" 128
sed -i 's|pos = lo + ((2 \* i.to(tl.int64) + 1) \* (hi - lo)) // (2 \* S)|pos = lo + i.to(tl.int64)|' "$kernel"
row "on 512 contiguous candidates"
