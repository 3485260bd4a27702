"""Launch settings of certified int8-threshold selection (page_threshold: the sampled cut, then its
two passes), one layer, eps 1e-2, peaked queries, at the TinyLlama shape in fp16 and Qwen2.5-Coder-0.5B's
in bf16: keys per pass-1 tile, its software-pipelining stages, and the most pass-1 programs (past
them, blocks grow beyond PAGE_SCAN's block_keys: pass 2 reads one histogram per block). CUDA-graph
timings; writes JSON and Markdown.

    python bench/tune_threshold.py --contexts 32768,131072,1048576 --out results/tune_threshold.json
    python bench/tune_threshold.py --render results/tune_threshold.json   # its Markdown table again
"""
from __future__ import annotations

import itertools
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench import sweep  # noqa: E402
from bench.attention import PEAK, make_cache  # noqa: E402
from minirt.kernels import triton_attention as tri  # noqa: E402

SETTINGS = {"tile_keys": (128, 256), "stages": (1, 3), "programs": (512, 1024)}
SHAPES = {"32q/4kv fp16 (TinyLlama)": (32, 4, torch.float16), "14q/2kv bf16 (Qwen2.5-Coder-0.5B)": (14, 2, torch.bfloat16)}


def table(results: dict) -> str:
    return sweep.settings_table(results, SETTINGS, ("shape", "context"), "same_thresholds",
                                "thresholds as the current's")


def main() -> None:
    args = sweep.arguments(__doc__, "32768,131072,1048576", "results/tune_threshold.json", table)
    if args is None:
        return
    results = sweep.results(dict(tri.PAGE_SCAN))
    for (shape, (Hq, Hkv, dtype)), n in itertools.product(SHAPES.items(), map(int, args.contexts.split(","))):
        torch.manual_seed(n)
        cache = make_cache(Hq, Hkv, 64, n, sweep.POLICY, dtype)
        q = torch.randn(1, Hq, 64, device="cuda", dtype=dtype) * PEAK
        select = lambda: tri.page_threshold(q, cache.k[0], cache.kq[0], cache.kscale[0], cache.kchan[0],  # noqa: E731
                                            cache.koffset[0], cache.bounds, 0.01, 1)[1]
        sweep.time_settings(tri.PAGE_SCAN, SETTINGS, select, {"shape": shape, "context": n}, results,
                            "same_thresholds")
        del cache
        torch.cuda.empty_cache()
    sweep.save(results, args.out, table)


if __name__ == "__main__":
    main()
