"""Launch settings of page_filtered_attention's gather over the kept keys (one layer, 32q/4kv x64
fp16, certified int8-threshold at eps 1e-2 with peaked queries, so tens of thousands of keys are
kept per KV head). CUDA-graph timings; writes JSON.

    python bench/tune_gather.py --contexts 131072,1048576 --out results/tune_gather.json
    python bench/tune_gather.py --render results/tune_gather.json   # its Markdown table again
"""
from __future__ import annotations

import itertools
import sys
from pathlib import Path

import torch
import triton

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench import sweep  # noqa: E402
from bench.attention import PEAK, make_cache  # noqa: E402
from minirt.kernels import reference, triton_attention as tri  # noqa: E402

SETTINGS = {"block_n": (32, 64, 128), "num_warps": (2, 4, 8), "num_stages": (2, 3), "programs_per_sm": (2, 4, 8, 16)}


def table(results: dict, best: int = 6) -> str:
    """Per context: the fastest settings, then the current ones and SPARSE's (the settings before)."""
    keys = tuple(SETTINGS)
    named = {tuple(results["meta"]["current"][k] for k in keys): "current (KEPT_GATHER)",
             tuple(tri.SPARSE[k] for k in keys): "SPARSE's"}
    out = ["| context | kept keys per KV head | " + " | ".join(keys) + " | us | |", "|---" * (len(keys) + 4) + "|"]
    for n in sorted({r["context"] for r in results["rows"]}):
        rows = sorted((r for r in results["rows"] if r["context"] == n), key=lambda r: r["us"])
        for r in rows[:best] + [r for r in rows[best:] if tuple(r[k] for k in keys) in named]:
            setting = tuple(r[k] for k in keys)
            out.append(f"| {n} | {r['kept_per_kv_head']} | " + " | ".join(map(str, setting))
                       + f" | {r['us']:.1f} | {named.get(setting, '')} |")
    return "\n".join(out) + "\n"


def main() -> None:
    args = sweep.arguments(__doc__, "131072,1048576", "results/tune_gather.json", table)
    if args is None:
        return
    results = sweep.results(tri.KEPT_GATHER)
    for n in map(int, args.contexts.split(",")):
        cache = make_cache(32, 4, 64, n, sweep.POLICY, torch.float16)
        torch.manual_seed(0)
        q = torch.randn(1, 32, 64, device="cuda", dtype=torch.float16) * PEAK
        ring_k, ring_v, k, v = cache.ring_k[0], cache.ring_v[0], cache.k[0], cache.v[0]
        page_bin, threshold, _ = tri.page_threshold(q, k, cache.kq[0], cache.kscale[0], cache.kchan[0],
                                                    cache.koffset[0], cache.bounds, 0.01, 1)
        bounds = reference.as_bounds(cache.bounds, None, q.device, sweep.POLICY.anchor, ring_k.shape[2])
        idx, count = tri.kept_list(page_bin, threshold, bounds, 1, k.shape[2])
        max_keys = ring_k.shape[2] + sweep.POLICY.anchor + k.shape[2]
        want = tri._attention(q, k, v, bounds, max_keys, (ring_k, ring_v, idx), None, tri.KEPT_GATHER, count=count)[0]
        for values in itertools.product(*SETTINGS.values()):
            cfg = {**tri.SPARSE, **dict(zip(SETTINGS, values))}
            step = lambda: tri._attention(q, k, v, bounds, max_keys, (ring_k, ring_v, idx), None, cfg, count=count)  # noqa: E731
            err = float((step()[0].float() - want.float()).abs().max())
            us = triton.testing.do_bench_cudagraph(step, rep=100) * 1000
            results["rows"].append({"context": n, "kept_per_kv_head": count.tolist()[0], **cfg, "us": us, "max_abs_diff": err})
            print(n, values, f"{us:.1f} us", flush=True)
        del cache
        torch.cuda.empty_cache()
    sweep.save(results, args.out, table)


if __name__ == "__main__":
    main()
