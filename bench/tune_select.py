"""Sweep the selection and sparse-attention launch settings on the runtime's sparse decode step.

    python bench/tune_select.py [--contexts 1048576] [--selection pages] [--out results/tune_select]

Times one layer's decode step (append, select, attend) as a CUDA-graph replay under
triton.testing.do_bench (median; L2 flushed between calls), for every combination in GRID, so
kernels/triton_attention.SELECT and SPARSE are chosen from measurement. Writes JSON.
"""
from __future__ import annotations

import argparse
import itertools
import json
import sys
from pathlib import Path

import torch
from triton.testing import do_bench

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench.attention import SHAPES, graphed, make_cache  # noqa: E402
from minirt.kernels import triton_attention as tri  # noqa: E402

GRID = {"fan": [32, 64], "token_block": [256, 512], "pick_warps": [4, 8], "scan_warps": [4, 8], "scan_block": [64, 128],
        "sparse_block_n": [32], "sparse_num_warps": [4]}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--contexts", default="1048576")
    ap.add_argument("--selection", default="pages", choices=["exact", "pages"])
    ap.add_argument("--summary-dtype", default="cache", choices=["cache", "fp8"])
    ap.add_argument("--grid", type=json.loads, default=GRID, help="JSON like GRID, to sweep other values")
    ap.add_argument("--out", default="results/tune_select")
    args = ap.parse_args()
    grid = args.grid
    defaults = {**tri.SELECT, **{f"sparse_{key}": val for key, val in tri.SPARSE.items()}}
    rows = []
    for n in map(int, args.contexts.split(",")):
        for name, (Hq, Hkv, D) in SHAPES.items():
            cache = make_cache(Hq, Hkv, D, n, args.selection, torch.float16, args.summary_dtype)
            q = torch.randn(1, Hq, 1, D, device="cuda", dtype=torch.float16)
            kv = torch.randn(2, 1, Hkv, 1, D, device="cuda", dtype=torch.float16)
            best = None
            for values in itertools.product(*grid.values()):
                config = dict(zip(grid, values))
                tri.SELECT.update({key: val for key, val in config.items() if key in tri.SELECT})
                tri.SPARSE.update({key[7:]: val for key, val in config.items() if key.startswith("sparse_")})
                graph = graphed(lambda _: cache.attend(0, q, kv[0], kv[1]), [None])[0]
                ms = do_bench(graph.replay, return_mode="median")
                rows.append({"context": n, "shape": name, "selection": args.selection, "summaries": args.summary_dtype,
                             **config, "ms": ms})
                best = min(best or rows[-1], rows[-1], key=lambda r: r["ms"])
            default = next((r for r in rows if r["context"] == n and r["shape"] == name
                            and all(r[key] == defaults[key] for key in grid)), None)
            shown = "not in grid" if default is None else f"{default['ms'] * 1e3:.1f} us"
            print(f"{name} n={n} {args.selection}: default {shown}, best {best['ms'] * 1e3:.1f} us "
                  f"{ {key: best[key] for key in grid} }", flush=True)
    tri.SELECT.update({key: val for key, val in defaults.items() if key in tri.SELECT})
    tri.SPARSE.update({key[7:]: val for key, val in defaults.items() if key.startswith("sparse_")})
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out + ".json").write_text(json.dumps({"meta": {"device": torch.cuda.get_device_name(), "torch": torch.__version__,
                                                         "dtype": "fp16"}, "rows": rows}, indent=2))


if __name__ == "__main__":
    main()
