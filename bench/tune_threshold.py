"""Launch settings of certified int8-threshold selection (page_threshold's two passes), one layer,
32q/4kv x64 fp16, eps 1e-2, peaked queries: keys per pass-1 block (its minimum; pass 2 reads one
histogram per block) and blocks per pass-2 tile. CUDA-graph timings; writes JSON and Markdown.

    python bench/tune_threshold.py --contexts 32768,131072,1048576 --out results/tune_threshold.json
    python bench/tune_threshold.py --render results/tune_threshold.json   # its Markdown table again
"""
from __future__ import annotations

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench import sweep  # noqa: E402
from bench.attention import PEAK, make_cache  # noqa: E402
from minirt.kernels import triton_attention as tri  # noqa: E402

SETTINGS = {"block_keys": (512, 1024, 2048, 4096), "blocks_per_tile": (16, 32, 64)}


def table(results: dict) -> str:
    return sweep.settings_table(results, SETTINGS, ("context",), "same_thresholds", "thresholds as the current's")


def main() -> None:
    args = sweep.arguments(__doc__, "32768,131072,1048576", "results/tune_threshold.json", table)
    if args is None:
        return
    results = sweep.results(dict(tri.PAGE_SCAN))
    for n in map(int, args.contexts.split(",")):
        torch.manual_seed(n)
        cache = make_cache(32, 4, 64, n, sweep.POLICY, torch.float16)
        q = torch.randn(1, 32, 64, device="cuda", dtype=torch.float16) * PEAK
        select = lambda: tri.page_threshold(q, cache.k[0], cache.kq[0], cache.kscale[0], cache.kchan[0],  # noqa: E731
                                            cache.koffset[0], cache.bounds, 0.01, 1)[1]
        sweep.time_settings(tri.PAGE_SCAN, SETTINGS, select, {"context": n}, results, "same_thresholds")
        del cache
        torch.cuda.empty_cache()
    sweep.save(results, args.out, table)


if __name__ == "__main__":
    main()
