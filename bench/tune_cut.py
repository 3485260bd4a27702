"""Launch settings of certified int8-threshold's sampled cut (triton_attention.sampled_cut, its
own launch before page_threshold's scan), one layer, fp16, eps 1e-2, peaked queries, at the
TinyLlama, Qwen2.5-Coder-0.5B and SmolLM2 head shapes: the program's warps and the anchor and
window's keys per tile. CUDA-graph timings; writes JSON and Markdown.

    python bench/tune_cut.py --contexts 32768 --out results/tune_cut.json
    python bench/tune_cut.py --render results/tune_cut.json   # its Markdown table again
"""
from __future__ import annotations

import itertools
import sys
from pathlib import Path
from typing import Callable

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench import sweep  # noqa: E402
from bench.attention import PEAK, make_cache  # noqa: E402
from minirt.kernels import triton_attention as tri  # noqa: E402

SETTINGS = {"cut_warps": (4, 8, 16), "cut_base_keys": (128, 256)}
SHAPES = {"32q/4kv (TinyLlama)": (32, 4), "14q/2kv (Qwen2.5-Coder-0.5B)": (14, 2), "9q/3kv (SmolLM2)": (9, 3)}


def table(results: dict) -> str:
    return sweep.settings_table(results, SETTINGS, ("shape", "context"), "same_cuts", "cuts as the current's")


def cut_launch(Hq: int, Hkv: int, n: int) -> Callable[[], torch.Tensor]:
    """sampled_cut on a one-layer cache of n random keys (64 per head), fp16, eps 1e-2, peaked
    queries, seeded by n; the cache lives as long as the function."""
    torch.manual_seed(n)
    cache = make_cache(Hq, Hkv, 64, n, sweep.POLICY, torch.float16)
    q = torch.randn(1, Hq, 64, device="cuda", dtype=torch.float16) * PEAK
    return lambda: tri.sampled_cut(q, cache.kq[0], cache.kscale[0], cache.kchan[0], cache.koffset[0], cache.bounds, 0.01)


def main() -> None:
    args = sweep.arguments(__doc__, "32768", "results/tune_cut.json", table)
    if args is None:
        return
    results = sweep.results(dict(tri.PAGE_SCAN))
    for (shape, (Hq, Hkv)), n in itertools.product(SHAPES.items(), map(int, args.contexts.split(","))):
        cut = cut_launch(Hq, Hkv, n)
        sweep.time_settings(tri.PAGE_SCAN, SETTINGS, cut, {"shape": shape, "context": n}, results, "same_cuts")
        del cut
        torch.cuda.empty_cache()
    sweep.save(results, args.out, table)


if __name__ == "__main__":
    main()
