"""Sweep the dense decode kernel's launch settings (block size, programs per SM, warps, stages).

    python bench/tune_decode.py [--out results/tune_decode]

Prints and writes, per context and shape, each setting's median time (CUDA-graph replay, so
Python launch overhead is out) against SDPA flash timed the same way, so the defaults in
kernels/triton_attention.DECODE are chosen from measurement.
"""
from __future__ import annotations

import argparse
import itertools
import json
import sys
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel
from triton.testing import do_bench

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench.attention import SHAPES, graphed  # noqa: E402
from minirt.kernels import triton_attention as tri  # noqa: E402
from minirt.kernels.reference import step_bounds  # noqa: E402

GRID = {"block_n": [32, 64, 128], "programs_per_sm": [2, 4, 8], "num_warps": [4, 8], "num_stages": [2, 3]}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--contexts", default="32768,131072,1048576")
    ap.add_argument("--out", default="results/tune_decode")
    args = ap.parse_args()
    rows = []
    for n in map(int, args.contexts.split(",")):
        for name, (Hq, Hkv, D) in SHAPES.items():
            q = torch.randn(1, Hq, D, device="cuda", dtype=torch.float16)
            k, v = (torch.randn(1, Hkv, n, D, device="cuda", dtype=torch.float16) for _ in range(2))
            bounds = step_bounds(n, 0, n, "cuda")  # made before capture: a graph cannot copy from the host
            def flash_fn(_):
                with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
                    return F.scaled_dot_product_attention(q[:, :, None], k, v, enable_gqa=True)
            flash = do_bench(graphed(flash_fn, [None])[0].replay, return_mode="median")
            best = None
            for values in itertools.product(*GRID.values()):
                config = dict(zip(GRID, values))
                graph = graphed(lambda _: tri.decode_attention(q, k, v, bounds, config=config), [None])[0]
                ms = do_bench(graph.replay, return_mode="median")
                rows.append({"context": n, "shape": name, **config, "ms": ms, "flash_ms": flash})
                best = min(best or rows[-1], rows[-1], key=lambda r: r["ms"])
            default = next(r for r in rows if r["context"] == n and r["shape"] == name
                           and all(r[key] == val for key, val in tri.DECODE.items()))
            print(f"{name} n={n}: flash {flash:.4f} ms, default {default['ms']:.4f}, best {best['ms']:.4f} "
                  f"{ {key: best[key] for key in GRID} }", flush=True)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out + ".json").write_text(json.dumps({"meta": {"device": torch.cuda.get_device_name(), "torch": torch.__version__,
                                                         "dtype": "fp16"}, "rows": rows}, indent=2))


if __name__ == "__main__":
    main()
