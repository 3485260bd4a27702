"""Launch settings of certified int8-threshold selection (page_threshold's two passes), one layer,
32q/4kv x64 fp16, eps 1e-2, peaked queries: keys per pass-1 block (its minimum; pass 2 reads one
histogram per block) and blocks per pass-2 tile. CUDA-graph timings; writes JSON and Markdown.

    python bench/tune_threshold.py --contexts 32768,131072,1048576 --out results/tune_threshold.json
    python bench/tune_threshold.py --render results/tune_threshold.json   # its Markdown table again
"""
from __future__ import annotations

import argparse
import itertools
import json
import sys
from pathlib import Path

import torch
import triton

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench.attention import PEAK, make_cache  # noqa: E402
from minirt.config import CondensateConfig  # noqa: E402
from minirt.kernels import triton_attention as tri  # noqa: E402

SETTINGS = {"block_keys": (512, 1024, 2048, 4096), "blocks_per_tile": (16, 32, 64)}


def table(results: dict) -> str:
    keys = tuple(SETTINGS)
    current = tuple(results["meta"]["current"][k] for k in keys)
    out = ["| context | " + " | ".join(keys) + " | us | thresholds as the current's | |", "|---" * (len(keys) + 4) + "|"]
    for r in sorted(results["rows"], key=lambda r: (r["context"], r["us"])):
        setting = tuple(r[k] for k in keys)
        out.append(f"| {r['context']} | " + " | ".join(map(str, setting)) + f" | {r['us']:.1f} | {'yes' if r['same_thresholds'] else 'no'} | "
                   + ("current (PAGE_SCAN)" if setting == current else "") + " |")
    return "\n".join(out) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--contexts", default="32768,131072,1048576")
    ap.add_argument("--out", default="results/tune_threshold.json")
    ap.add_argument("--render", metavar="JSON", help="print the Markdown table of a run's JSON")
    args = ap.parse_args()
    if args.render:
        print(table(json.loads(Path(args.render).read_text())), end="")
        return
    policy = CondensateConfig(selection="int8-threshold", page_size=1, max_dropped_mass=0.01)
    current = dict(tri.PAGE_SCAN)
    results = {"meta": {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "triton": triton.__version__,
                        "current": current}, "rows": []}
    for n in map(int, args.contexts.split(",")):
        torch.manual_seed(n)
        cache = make_cache(32, 4, 64, n, policy, torch.float16)
        q = torch.randn(1, 32, 64, device="cuda", dtype=torch.float16) * PEAK
        select = lambda: tri.page_threshold(q, cache.k[0], cache.kq[0], cache.kscale[0], cache.kchan[0],  # noqa: E731
                                            cache.bounds, 0.01, 1)
        want = select()[1]
        for values in itertools.product(*SETTINGS.values()):
            tri.PAGE_SCAN.update(zip(SETTINGS, values))
            same = torch.equal(select()[1], want)  # summation order may move a threshold by a bin
            us = triton.testing.do_bench_cudagraph(select, rep=100) * 1000
            results["rows"].append({"context": n, **dict(zip(SETTINGS, values)), "us": us, "same_thresholds": same})
            print(n, values, f"{us:.1f} us", flush=True)
        tri.PAGE_SCAN.update(current)
        del cache
        torch.cuda.empty_cache()
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(results, indent=1))
    Path(args.out).with_suffix(".md").write_text(table(results))


if __name__ == "__main__":
    main()
